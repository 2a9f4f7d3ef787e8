"""Zero-shot and MMLU accuracy through lm_eval, on the in-memory (compressed) model, on- or offline.

Online (no ``data_dir``) the stock lm_eval tasks are used by name. Offline, every task is lm_eval's own
stock task config (its ``doc_to_text``/``doc_to_choice``/``doc_to_target``/``process_docs`` and metrics,
loaded from the installed lm_eval) with only the data source replaced: ``dataset_path: json`` and
``data_files`` pointing at ``<data_dir>/tasks/<task>/<split>.jsonl[.gz]`` (the layout of ../shared/data).

Metric per task, as the papers and the OATS reference report it: ``acc_norm`` where the task defines it
(ARC-e/c, OpenBookQA, PIQA, HellaSwag), else ``acc`` (BoolQ, RTE, WinoGrande); the zero-shot mean is
the unweighted mean of those numbers over the tasks run (MMLU excluded). MMLU is 5-shot by default
(dev split as the few-shot pool, first 5 in order, lm_eval's ``first_n`` sampler), and its overall
number is the question-count-weighted mean over the chosen subjects (lm_eval's ``mmlu`` group
aggregation; the OATS reference's 10 subjects are :data:`OATS_MMLU_SUBJECTS`).

HellaSwag offline: the staged file is an approximation (see ../shared/data/README.md), so it runs as the
custom task ``hellaswag_approx`` (``doc_to_text: query``, ``doc_to_choice: choices``, ``doc_to_target:
gold``) and its result is stored under that name and listed in ``metrics.zero_shot_info.approximate``.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from data.files import cache_dir as data_cache_dir, read_jsonl

log = logging.getLogger(__name__)

# The eight commonsense tasks of the Wanda/SparseGPT/OATS tables, in the papers' column order.
PAPER_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "piqa")
# Names allowed in config key `zero_shot_tasks`.
ZERO_SHOT_TASKS = PAPER_TASKS + ("mmlu",)
APPROX_SUFFIX = "_approx"

MMLU_SUBJECTS = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge", "college_biology",
    "college_chemistry", "college_computer_science", "college_mathematics", "college_medicine", "college_physics",
    "computer_security", "conceptual_physics", "econometrics", "electrical_engineering", "elementary_mathematics",
    "formal_logic", "global_facts", "high_school_biology", "high_school_chemistry", "high_school_computer_science",
    "high_school_european_history", "high_school_geography", "high_school_government_and_politics",
    "high_school_macroeconomics", "high_school_mathematics", "high_school_microeconomics", "high_school_physics",
    "high_school_psychology", "high_school_statistics", "high_school_us_history", "high_school_world_history",
    "human_aging", "human_sexuality", "international_law", "jurisprudence", "logical_fallacies", "machine_learning",
    "management", "marketing", "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition",
    "philosophy", "prehistory", "professional_accounting", "professional_law", "professional_medicine",
    "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy", "virology",
    "world_religions",
)
# The 10 subjects the OATS reference code (stephenqz/OATS, main.py) evaluates 5-shot.
OATS_MMLU_SUBJECTS = (
    "abstract_algebra", "business_ethics", "college_computer_science", "college_mathematics", "conceptual_physics",
    "formal_logic", "machine_learning", "miscellaneous", "philosophy", "global_facts",
)


@dataclass(frozen=True)
class TaskSpec:
    """How one paper task maps onto lm_eval: its stock config file and its local data file."""

    name: str  # key in metrics.zero_shot
    stock_yaml: str  # relative to lm_eval/tasks/
    local_dir: str  # <data_dir>/tasks/<local_dir>/
    split: str  # the split the stock task evaluates (and the local file's name)
    metric: str  # the papers' metric: acc_norm where it exists, else acc


TASK_SPECS: dict[str, TaskSpec] = {
    # lm_eval's `boolq` and `sglue_rte` read the SuperGLUE fields the local files have; `rte` (GLUE) is the
    # same 277 validation pairs and prompt with fields named sentence1/sentence2.
    "boolq": TaskSpec("boolq", "super_glue/boolq/default.yaml", "boolq", "validation", "acc"),
    "rte": TaskSpec("rte", "super_glue/rte/default.yaml", "rte", "validation", "acc"),
    "hellaswag": TaskSpec("hellaswag", "hellaswag/hellaswag.yaml", "hellaswag", "validation", "acc_norm"),
    "winogrande": TaskSpec("winogrande", "winogrande/default.yaml", "winogrande", "validation", "acc"),
    "arc_easy": TaskSpec("arc_easy", "arc/arc_easy.yaml", "arc_easy", "test", "acc_norm"),
    "arc_challenge": TaskSpec("arc_challenge", "arc/arc_challenge.yaml", "arc_challenge", "test", "acc_norm"),
    "openbookqa": TaskSpec("openbookqa", "openbookqa/openbookqa.yaml", "openbookqa", "test", "acc_norm"),
    "piqa": TaskSpec("piqa", "piqa/piqa.yaml", "piqa", "validation", "acc_norm"),
}
HELLASWAG_APPROX_FILE = "APPROX_klosax_val_preprocessed.jsonl.gz"


class TaskDataError(RuntimeError):
    """A task's local data file is missing or unusable; the message says what to fix."""


def _lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def stock_task_config(rel_yaml: str) -> dict[str, Any]:
    """lm_eval's own config dict for a stock task YAML (includes and ``!function`` resolved)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    path = _lm_eval_tasks_dir() / rel_yaml
    if not path.is_file():
        import lm_eval

        raise TaskDataError(f"stock task config {path} not found in lm_eval {getattr(lm_eval, '__version__', '?')}")
    cfg = copy.deepcopy(load_yaml(path, resolve_func=True))
    for k in ("tag", "group"):
        cfg.pop(k, None)
    return cfg


def _find_split_file(folder: Path, split: str) -> Path | None:
    for name in (f"{split}.jsonl.gz", f"{split}.jsonl"):
        if (folder / name).is_file():
            return folder / name
    return None


def with_local_files(cfg: dict[str, Any], data_files: dict[str, str], task: str | None = None) -> dict[str, Any]:
    """Copy of a task config reading ``data_files`` ({split: path}) through the ``json`` loader, no hub.

    Split keys the files do not provide are cleared, so lm_eval never asks for a missing split; few-shot
    examples then come from the evaluated split (lm_eval drops the document itself from its context)."""
    out = copy.deepcopy(cfg)
    out["dataset_path"] = "json"
    out["dataset_name"] = None
    out["dataset_kwargs"] = {"data_files": dict(data_files)}
    for key, split in (("training_split", "train"), ("validation_split", "validation"), ("test_split", "test")):
        if out.get(key) not in data_files:
            out[key] = None
    if out.get("fewshot_split") not in data_files:
        out.pop("fewshot_split", None)
    if task:
        out["task"] = task
    return out


def hellaswag_approx_config(path: str) -> dict[str, Any]:
    """Custom task over the klosax HellaSwag approximation (already-preprocessed ``query``/``choices``/``gold``)."""
    return {
        "task": "hellaswag" + APPROX_SUFFIX,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {"validation": path}},
        "output_type": "multiple_choice",
        "validation_split": "validation",
        "doc_to_text": "{{query}}",
        "doc_to_choice": "choices",
        "doc_to_target": "{{gold}}",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0, "approximation": "klosax preprocessed HellaSwag validation (not lm_eval's process_docs)"},
    }


def local_task_config(name: str, data_root: Path) -> dict[str, Any]:
    """The offline task config for paper task ``name`` under data root ``data_root`` (../shared/data layout)."""
    spec = TASK_SPECS[name]
    folder = Path(data_root) / "tasks" / spec.local_dir
    path = _find_split_file(folder, spec.split)
    if path is None and name == "hellaswag" and (folder / HELLASWAG_APPROX_FILE).is_file():
        log.warning("hellaswag: exact validation file missing; using the approximation %s as task 'hellaswag_approx'",
                    folder / HELLASWAG_APPROX_FILE)
        return hellaswag_approx_config(str(folder / HELLASWAG_APPROX_FILE))
    if path is None:
        raise TaskDataError(
            f"zero-shot task {name!r}: no {spec.split}.jsonl[.gz] in {folder}; lay out data_dir like ../shared/data/ "
            f"(tasks/<task>/<split>.jsonl[.gz]) or unset data_dir to load from the hub"
        )
    return with_local_files(stock_task_config(spec.stock_yaml), {spec.split: str(path)}, task=name)


def mmlu_subject_files(data_root: Path, cache_dir: Path | None = None) -> dict[str, dict[str, str]]:
    """Split the staged MMLU test/dev files by ``subject`` into per-subject jsonl files in a cache dir.

    Returns {subject: {"test": path, "dev": path}}. The cache dir is keyed by the source files' size and
    mtime, so a changed source is split again; the repo and the data dir are never written."""
    folder = Path(data_root) / "tasks" / "mmlu"
    src = {s: _find_split_file(folder, s) for s in ("test", "dev")}
    if any(p is None for p in src.values()):
        raise TaskDataError(f"mmlu: need test.jsonl[.gz] and dev.jsonl[.gz] in {folder}")
    key = hashlib.sha256("|".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in src.values()).encode()).hexdigest()[:12]
    out_dir = Path(cache_dir or data_cache_dir("tasks")) / f"mmlu-{key}"
    files = {s: {sp: str(out_dir / f"{s}_{sp}.jsonl") for sp in src} for s in MMLU_SUBJECTS}
    if not (out_dir / "DONE").is_file():
        out_dir.mkdir(parents=True, exist_ok=True)
        for split, path in src.items():
            by_subject: dict[str, list[str]] = {s: [] for s in MMLU_SUBJECTS}
            for row in read_jsonl(path):
                by_subject.setdefault(row["subject"], []).append(json.dumps(row))
            for s in MMLU_SUBJECTS:
                tmp = out_dir / f".{s}_{split}.jsonl.tmp"
                tmp.write_text("\n".join(by_subject[s]) + "\n", encoding="utf-8")
                os.replace(tmp, out_dir / f"{s}_{split}.jsonl")
        (out_dir / "DONE").write_text("ok\n")
    return files


def mmlu_task_configs(subjects: Sequence[str], data_root: Path | None) -> list[str | dict[str, Any]]:
    """lm_eval tasks for the MMLU subjects: stock names online, stock configs on per-subject files offline."""
    if data_root is None:
        return [f"mmlu_{s}" for s in subjects]
    files = mmlu_subject_files(data_root)
    return [with_local_files(stock_task_config(f"mmlu/default/mmlu_{s}.yaml"), files[s], task=f"mmlu_{s}") for s in subjects]


def task_entries(tasks: Iterable[str], data_root: Path | None) -> list[str | dict[str, Any]]:
    """What to hand lm_eval for the paper tasks: names online, config dicts offline."""
    if data_root is None:
        return list(tasks)
    return [local_task_config(t, data_root) for t in tasks]


def _set_offline() -> None:
    """Local files only: make sure nothing reaches for the hub."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import datasets

        datasets.config.HF_DATASETS_OFFLINE = True
        datasets.config.HF_HUB_OFFLINE = True
    except Exception:  # pragma: no cover - older/newer datasets without these attributes
        pass


def make_lm(model, tokenizer, batch_size: int = 8, max_length: int | None = None):
    """lm_eval's HFLM around an already-loaded (compressed) model: no save/reload round trip."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)


def run_lm_eval(lm, entries: Sequence[str | dict[str, Any]], *, limit: int | None, num_fewshot: int,
                offline: bool, log_samples: bool = False) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` on ``entries`` (task names and/or config dicts); returns its raw output."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    if offline:
        _set_offline()
    # Offline, every task arrives as a config dict: an empty index (no scan of lm_eval's 10k YAMLs) suffices.
    all_dicts = all(isinstance(e, dict) for e in entries)
    tm = TaskManager(include_defaults=not all_dicts)
    return lm_eval.simple_evaluate(
        model=lm, tasks=list(entries), num_fewshot=num_fewshot, limit=limit, task_manager=tm,
        log_samples=log_samples, bootstrap_iters=0, random_seed=0, numpy_random_seed=1234, torch_random_seed=1234,
        fewshot_random_seed=1234,
    )


def _metric(res: dict[str, Any], name: str) -> float | None:
    v = res.get(f"{name},none")
    return float(v) if isinstance(v, (int, float)) else None


def summarize_zero_shot(raw: dict[str, Any]) -> tuple[dict[str, float], dict[str, Any]]:
    """lm_eval output -> ({task: paper metric}, info). ``mean`` is the unweighted mean over the tasks."""
    scores: dict[str, float] = {}
    info: dict[str, Any] = {"metric": {}, "acc": {}, "acc_norm": {}, "n": {}, "approximate": []}
    for task, res in raw["results"].items():
        base = task[: -len(APPROX_SUFFIX)] if task.endswith(APPROX_SUFFIX) else task
        metric = TASK_SPECS[base].metric if base in TASK_SPECS else ("acc_norm" if _metric(res, "acc_norm") is not None else "acc")
        value = _metric(res, metric)
        if value is None:  # a task without acc_norm (should not happen for the paper tasks)
            metric, value = "acc", _metric(res, "acc")
        scores[task] = value
        info["metric"][task] = metric
        info["acc"][task] = _metric(res, "acc")
        info["acc_norm"][task] = _metric(res, "acc_norm")
        info["n"][task] = int(raw.get("n-samples", {}).get(task, {}).get("effective", 0))
        if task.endswith(APPROX_SUFFIX):
            info["approximate"].append(task)
    ordered = {t: scores[t] for t in sorted(scores, key=lambda t: _paper_order(t))}
    if ordered:
        ordered["mean"] = sum(ordered.values()) / len(ordered)
        info["mean_over"] = [t for t in ordered if t != "mean"]
        samples = raw.get("samples") or {}
        per_example = {t: per_example_string(samples[t], info["metric"][t]) for t in info["mean_over"] if t in samples}
        if per_example:
            info["per_example"] = per_example
    return ordered, info


def per_example_string(samples: Sequence[dict[str, Any]], metric: str) -> str:
    """lm_eval's logged samples of one task -> '0110...': the metric of each document, in ``doc_id`` order.

    A string, not a list, so a record stays small and the seed aggregation (numeric leaves) ignores it."""
    return "".join("1" if float(s[metric]) > 0.5 else "0" for s in sorted(samples, key=lambda s: s["doc_id"]))


def paired_difference(a: dict[str, Any] | Sequence[dict[str, Any]], b: dict[str, Any],
                      exclude: Sequence[str] = ()) -> dict[str, Any]:
    """Accuracy of model a minus model b on the same documents, with the paired standard error.

    ``a`` is one record's ``zero_shot_info`` (with ``per_example``) or several (the calibration seeds of
    one row: a question's score is then the share of them that answer it right); ``b`` is one. Per task,
    on the first ``n`` documents every record was scored on (the limit takes a file's first rows, so a
    common prefix is the same documents): diff = mean of d_i = a_i - b_i, se = sample std of d (ddof 1) /
    sqrt(n), and ``se_unpaired`` = sqrt(var(a)/n + var(b)/n) with population variances (p(1 - p) for one
    record), what independent samples would give. The mean over the tasks all have: the mean of the task
    differences, se = sqrt(sum se_t^2) / T (tasks independent). The models answer the same questions, so
    most of the per-question difficulty cancels and the paired se is the one to judge a difference by.

    With several records ``mean`` also holds ``per_record`` (each one's mean difference on the same
    questions) and ``se_records`` (their sample std / sqrt(k)): the spread between seeds, which the paired
    se, a sampling error over questions, does not see.

    ``exclude`` names tasks left out of the table and the mean (e.g. ``("boolq",)``, whose score on a small
    model mostly follows its yes/no bias); a name no record holds is a ``ValueError``."""
    records = [a] if isinstance(a, dict) else list(a)
    if not records:
        raise ValueError("paired_difference: no record to compare")
    per = [r.get("per_example") or {} for r in records]
    pb = b.get("per_example") or {}
    if not all(per) or not pb:
        raise ValueError("paired_difference: every zero_shot_info needs per_example (records written before it "
                         "was recorded have none: evaluate again)")
    exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    unknown = sorted(set(exclude) - set().union(pb, *per))
    if unknown:
        raise ValueError(f"paired_difference: exclude names {unknown}, which no record holds; "
                         f"tasks: {sorted(set().union(pb, *per))}")
    k = len(per)
    tasks: dict[str, dict[str, float]] = {}
    record_diffs: dict[str, list[float]] = {}
    for t in [t for t in per[0] if t in pb and all(t in pa for pa in per) and t not in exclude]:
        n = min([len(pb[t])] + [len(pa[t]) for pa in per])
        if n < 2:
            continue
        bits = [[int(c) for c in pa[t][:n]] for pa in per]
        xa = [sum(col) / k for col in zip(*bits)]
        xb = [int(c) for c in pb[t][:n]]
        d = [x - y for x, y in zip(xa, xb)]
        mean_d = sum(d) / n
        var_d = sum((v - mean_d) ** 2 for v in d) / (n - 1)
        acc_a, acc_b = sum(xa) / n, sum(xb) / n
        var_a = sum((x - acc_a) ** 2 for x in xa) / n
        tasks[t] = {"diff": mean_d, "se": (var_d / n) ** 0.5, "n": n, "acc_a": acc_a, "acc_b": acc_b,
                    "se_unpaired": ((var_a + acc_b * (1 - acc_b)) / n) ** 0.5}
        record_diffs[t] = [sum(row) / n - acc_b for row in bits]
    if not tasks:
        raise ValueError("paired_difference: the records share no task with per-example results")
    T = len(tasks)
    mean = {"diff": sum(v["diff"] for v in tasks.values()) / T,
            "se": sum(v["se"] ** 2 for v in tasks.values()) ** 0.5 / T,
            "se_unpaired": sum(v["se_unpaired"] ** 2 for v in tasks.values()) ** 0.5 / T}
    if k > 1:
        per_record = [sum(record_diffs[t][j] for t in tasks) / T for j in range(k)]
        m = sum(per_record) / k
        mean["per_record"] = per_record
        mean["se_records"] = (sum((x - m) ** 2 for x in per_record) / (k - 1) / k) ** 0.5
    return {"tasks": tasks, "mean": mean}


def _paper_order(task: str) -> int:
    base = task[: -len(APPROX_SUFFIX)] if task.endswith(APPROX_SUFFIX) else task
    return PAPER_TASKS.index(base) if base in PAPER_TASKS else len(PAPER_TASKS)


def summarize_mmlu(raw: dict[str, Any]) -> dict[str, Any]:
    """Per-subject acc and the question-count-weighted mean (lm_eval's ``mmlu`` group aggregation)."""
    subjects: dict[str, dict[str, float]] = {}
    for task, res in raw["results"].items():
        if not task.startswith("mmlu_"):
            continue
        n = int(raw.get("n-samples", {}).get(task, {}).get("effective", 0))
        subjects[task[len("mmlu_"):]] = {"acc": _metric(res, "acc"), "n": n}
    total = sum(s["n"] for s in subjects.values())
    acc = sum(s["acc"] * s["n"] for s in subjects.values()) / total if total else float("nan")
    return {"acc": acc, "n": total, "subjects": subjects}


def zero_shot_metrics(model, tokenizer, cfg: Any) -> dict[str, Any]:
    """Everything the config's ``zero_shot_tasks`` asks for, as entries to merge into ``metrics``:
    ``zero_shot`` ({task: score, ..., mean}), ``zero_shot_info`` and, with ``mmlu``, ``mmlu``."""
    from data import resolve_data_dir

    root = resolve_data_dir(cfg.data_dir)
    tasks = [t for t in cfg.zero_shot_tasks if t != "mmlu"]
    out: dict[str, Any] = {}
    lm = make_lm(model, tokenizer, cfg.zero_shot_batch_size)
    if tasks:
        raw = run_lm_eval(lm, task_entries(tasks, root), limit=cfg.zero_shot_limit, num_fewshot=cfg.zero_shot_fewshot,
                          offline=root is not None, log_samples=True)
        scores, info = summarize_zero_shot(raw)
        info.update(limit=cfg.zero_shot_limit, fewshot=cfg.zero_shot_fewshot, source="local files" if root else "hub")
        out["zero_shot"], out["zero_shot_info"] = scores, info
        for t, v in scores.items():
            log.info("%s: zero-shot %s = %.4f", cfg.name, t, v)
    if "mmlu" in cfg.zero_shot_tasks:
        subjects = list(cfg.mmlu_subjects or MMLU_SUBJECTS)
        raw = run_lm_eval(lm, mmlu_task_configs(subjects, root), limit=cfg.zero_shot_limit, num_fewshot=cfg.mmlu_fewshot,
                          offline=root is not None)
        mmlu = summarize_mmlu(raw)
        mmlu.update(fewshot=cfg.mmlu_fewshot, limit=cfg.zero_shot_limit, weighting="question count")
        out["mmlu"] = mmlu
        out.setdefault("zero_shot", {})
        out["zero_shot"]["mmlu"] = mmlu["acc"]  # reported beside the tasks, never inside their mean
        log.info("%s: MMLU (%d-shot, %d subjects, %d questions) = %.4f", cfg.name, cfg.mmlu_fewshot, len(subjects), mmlu["n"], mmlu["acc"])
    return out
