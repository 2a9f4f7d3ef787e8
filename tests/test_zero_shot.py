"""Zero-shot / MMLU through lm_eval from local files: same scores as lm_eval's stock tasks, no hub access."""
from __future__ import annotations

import gzip
import json
import os

os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402

from eval import zero_shot as zs  # noqa: E402

STOCK_LIMIT = 4


def _rows(path, n):
    opener = gzip.open if str(path).endswith(".gz") else open
    out = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                out.append(json.loads(line))
            if len(out) == n:
                break
    return out


@pytest.fixture(scope="module")
def tiny_lm(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    return zs.make_lm(model, tok, batch_size=4)


def _stock_fed(name: str, rows: list[dict], rename: dict[str, str] | None = None) -> dict:
    """lm_eval's *stock* task config (hub dataset path untouched) whose dataset is replaced in memory by
    ``rows`` through lm_eval's own ``custom_dataset`` hook, under every split name the config uses."""
    import datasets

    rel = {"rte": "glue/rte/default.yaml"}.get(name, zs.TASK_SPECS[name].stock_yaml)
    cfg = zs.stock_task_config(rel)
    if rename:
        rows = [{rename.get(k, k): v for k, v in r.items()} for r in rows]
    splits = {cfg[k] for k in ("training_split", "validation_split", "test_split") if cfg.get(k)}
    ds = datasets.Dataset.from_list(rows)
    cfg["custom_dataset"] = lambda **_: datasets.DatasetDict({s: ds for s in splits})
    cfg["task"] = name
    return cfg


RENAMES = {
    "boolq": None,
    "rte": {"premise": "sentence1", "hypothesis": "sentence2"},  # stock `rte` is GLUE's: other field names
    "winogrande": None,
    "arc_easy": None,
    "arc_challenge": None,
    "openbookqa": None,
    "piqa": None,
}


@pytest.fixture(scope="module")
def module_data():
    from conftest import SHARED_DATA

    if not (SHARED_DATA / "README.md").is_file():
        pytest.skip(f"shared evaluation data not found at {SHARED_DATA} (set OATS_DATA_DIR to a folder laid out like it)")
    return SHARED_DATA


@pytest.fixture(scope="module")
def local_and_stock(tiny_lm, module_data):
    shared_data = module_data
    """One lm_eval run over the local-file tasks, one over the stock tasks fed the same first rows."""
    stock_cfgs = []
    for name, rename in RENAMES.items():
        spec = zs.TASK_SPECS[name]
        rows = _rows(zs._find_split_file(shared_data / "tasks" / spec.local_dir, spec.split), STOCK_LIMIT)
        stock_cfgs.append(_stock_fed(name, rows, rename))
    local = zs.run_lm_eval(tiny_lm, zs.task_entries(list(RENAMES), shared_data), limit=STOCK_LIMIT, num_fewshot=0,
                           offline=True, log_samples=True)
    stock = zs.run_lm_eval(tiny_lm, stock_cfgs, limit=STOCK_LIMIT, num_fewshot=0, offline=True, log_samples=True)
    return local, stock


@pytest.mark.parametrize("name", list(RENAMES))
def test_local_file_task_matches_stock_task_per_sample(local_and_stock, name):
    local, stock = local_and_stock
    a = sorted(local["samples"][name], key=lambda s: s["doc_id"])
    b = sorted(stock["samples"][name], key=lambda s: s["doc_id"])
    assert len(a) == len(b) == STOCK_LIMIT
    for x, y in zip(a, b):
        assert x["target"] == y["target"]
        assert [tuple(r) for r in x["arguments"]] == [tuple(r) for r in y["arguments"]]  # (context, continuation)
        assert x["filtered_resps"] == y["filtered_resps"]  # identical log-likelihoods
        assert x["acc"] == y["acc"]
    for metric in ("acc", "acc_norm"):
        assert local["results"][name].get(f"{metric},none") == stock["results"][name].get(f"{metric},none")


def test_per_example_record_reproduces_lm_evals_scores(local_and_stock):
    local, _ = local_and_stock
    scores, info = zs.summarize_zero_shot(local)
    assert set(info["per_example"]) == set(RENAMES)
    for task, bits in info["per_example"].items():
        assert len(bits) == STOCK_LIMIT and set(bits) <= {"0", "1"}
        assert sum(map(int, bits)) / len(bits) == pytest.approx(scores[task])  # the paper metric, not the other one
        by_doc = sorted(local["samples"][task], key=lambda s: s["doc_id"])
        assert bits == "".join(str(int(s[info["metric"][task]])) for s in by_doc)


def test_paired_difference_against_numpy():
    import numpy as np

    rng = np.random.default_rng(0)
    a_bits, b_bits = {}, {}
    for task, n in (("boolq", 50), ("piqa", 80), ("rte", 30)):
        a = rng.random(n) < 0.6
        b = np.where(rng.random(n) < 0.8, a, rng.random(n) < 0.5)  # mostly the same answers: correlated
        a_bits[task], b_bits[task] = "".join("1" if x else "0" for x in a), "".join("1" if x else "0" for x in b)
    a_bits["boolq"] += "1111"  # a longer run: only the common prefix is compared
    b_bits["arc_easy"] = "0101"  # a task only one side has: left out
    out = zs.paired_difference({"per_example": a_bits}, {"per_example": b_bits})
    assert list(out["tasks"]) == ["boolq", "piqa", "rte"]
    ses = []
    for task, v in out["tasks"].items():
        n = v["n"]
        xa = np.array([int(c) for c in a_bits[task][:n]], dtype=float)
        xb = np.array([int(c) for c in b_bits[task][:n]], dtype=float)
        d = xa - xb
        assert n == len(b_bits[task])
        assert v["diff"] == pytest.approx(d.mean())
        assert v["se"] == pytest.approx(d.std(ddof=1) / np.sqrt(n))
        assert v["se_unpaired"] == pytest.approx(np.sqrt(xa.mean() * (1 - xa.mean()) / n + xb.mean() * (1 - xb.mean()) / n))
        assert v["se"] < v["se_unpaired"]  # correlated answers: pairing removes the shared difficulty
        ses.append(v["se"])
    assert out["mean"]["diff"] == pytest.approx(np.mean([v["diff"] for v in out["tasks"].values()]))
    assert out["mean"]["se"] == pytest.approx(np.sqrt(np.sum(np.square(ses))) / 3)


def test_paired_difference_of_a_model_with_itself_is_exactly_zero():
    bits = {"per_example": {"rte": "0110100111", "piqa": "1110001"}}
    out = zs.paired_difference(bits, bits)
    assert out["mean"] == {"diff": 0.0, "se": 0.0, "se_unpaired": out["mean"]["se_unpaired"]}
    assert out["mean"]["se_unpaired"] > 0


def test_paired_difference_of_several_seeds_against_numpy():
    """A row's seeds averaged question by question, checked against numpy; the seed spread beside it."""
    import numpy as np

    rng = np.random.default_rng(1)
    dense = {t: rng.random(n) < 0.55 for t, n in (("boolq", 60), ("piqa", 40))}
    seeds = []
    for _ in range(3):
        rec = {t: np.where(rng.random(len(x)) < 0.7, x, rng.random(len(x)) < 0.5) for t, x in dense.items()}
        seeds.append({t: "".join("1" if v else "0" for v in x) for t, x in rec.items()})
    seeds[1]["piqa"] += "0000"  # longer: only the prefix every record has is compared
    seeds[2]["rte"] = "0101"  # a task the other records lack: left out
    b = {t: "".join("1" if v else "0" for v in x) for t, x in dense.items()}
    out = zs.paired_difference([{"per_example": r} for r in seeds], {"per_example": b})
    assert list(out["tasks"]) == ["boolq", "piqa"]
    ses, per_seed = [], np.zeros(3)
    for task, v in out["tasks"].items():
        n = v["n"]
        assert n == len(b[task])
        bits = np.array([[int(c) for c in r[task][:n]] for r in seeds], dtype=float)
        xb = np.array([int(c) for c in b[task]], dtype=float)
        d = bits.mean(axis=0) - xb
        assert v["diff"] == pytest.approx(d.mean())
        assert v["se"] == pytest.approx(d.std(ddof=1) / np.sqrt(n))
        assert v["acc_a"] == pytest.approx(bits.mean())
        assert v["se_unpaired"] == pytest.approx(np.sqrt(bits.mean(axis=0).var() / n + xb.var() / n))
        ses.append(v["se"])
        per_seed += bits.mean(axis=1) - xb.mean()
    per_seed /= 2
    assert out["mean"]["per_record"] == pytest.approx(list(per_seed))
    assert out["mean"]["diff"] == pytest.approx(per_seed.mean())  # the mean of the seeds' differences
    assert out["mean"]["se_records"] == pytest.approx(per_seed.std(ddof=1) / np.sqrt(3))
    assert out["mean"]["se"] == pytest.approx(np.sqrt(np.sum(np.square(ses))) / 2)
    one = zs.paired_difference([{"per_example": seeds[0]}], {"per_example": b})  # a list of one is one record
    assert one == zs.paired_difference({"per_example": seeds[0]}, {"per_example": b})
    assert "per_record" not in one["mean"]


def test_paired_difference_excluding_a_task_is_the_comparison_without_it():
    a = {"boolq": "1111011110", "piqa": "0110101101", "rte": "1011"}
    b = {"boolq": "0000100000", "piqa": "0100111100", "rte": "1001"}
    out = zs.paired_difference({"per_example": a}, {"per_example": b}, exclude=("boolq",))
    without = {t: v for t, v in a.items() if t != "boolq"}
    assert out == zs.paired_difference({"per_example": without}, {"per_example": {t: b[t] for t in without}})
    assert list(out["tasks"]) == ["piqa", "rte"]
    full = zs.paired_difference({"per_example": a}, {"per_example": b})
    assert full["mean"]["diff"] != pytest.approx(out["mean"]["diff"])  # boolq moved the mean: leaving it out shows
    with pytest.raises(ValueError, match=r"exclude names \['hellaswag'\].*tasks: \['boolq', 'piqa', 'rte'\]"):
        zs.paired_difference({"per_example": a}, {"per_example": b}, exclude=("hellaswag",))
    with pytest.raises(ValueError, match="share no task"):
        zs.paired_difference({"per_example": a}, {"per_example": b}, exclude=("boolq", "piqa", "rte"))


def test_paired_difference_needs_per_example_results():
    with pytest.raises(ValueError, match="per_example"):
        zs.paired_difference({"metric": {}}, {"per_example": {"rte": "01"}})
    with pytest.raises(ValueError, match="share no task"):
        zs.paired_difference({"per_example": {"rte": "0110"}}, {"per_example": {"piqa": "0110"}})
    with pytest.raises(ValueError, match="per_example"):
        zs.paired_difference([{"per_example": {"rte": "01"}}, {}], {"per_example": {"rte": "01"}})
    with pytest.raises(ValueError, match="no record"):
        zs.paired_difference([], {"per_example": {"rte": "01"}})


def test_hellaswag_runs_as_flagged_approximation(tiny_lm, shared_data):
    cfg = zs.local_task_config("hellaswag", shared_data)
    assert cfg["task"] == "hellaswag_approx"
    raw = zs.run_lm_eval(tiny_lm, [cfg], limit=3, num_fewshot=0, offline=True, log_samples=True)
    rows = _rows(shared_data / "tasks" / "hellaswag" / zs.HELLASWAG_APPROX_FILE, 3)
    samples = sorted(raw["samples"]["hellaswag_approx"], key=lambda s: s["doc_id"])
    for s, row in zip(samples, rows):
        assert s["target"] == row["gold"]
        assert [a[1] for a in s["arguments"]] == [" " + c for c in row["choices"]]
        assert s["arguments"][0][0] == row["query"]
    scores, info = zs.summarize_zero_shot(raw)
    assert "hellaswag_approx" in scores and "hellaswag" not in scores
    assert info["approximate"] == ["hellaswag_approx"] and info["metric"]["hellaswag_approx"] == "acc_norm"


def test_summary_metric_choice_and_unweighted_mean():
    raw = {
        "results": {
            "arc_easy": {"acc,none": 0.5, "acc_norm,none": 0.6},
            "boolq": {"acc,none": 0.7},
            "winogrande": {"acc,none": 0.4},
            "piqa": {"acc,none": 0.9, "acc_norm,none": 0.8},
        },
        "n-samples": {"arc_easy": {"effective": 100}, "boolq": {"effective": 10}, "winogrande": {"effective": 1}, "piqa": {"effective": 5}},
    }
    scores, info = zs.summarize_zero_shot(raw)
    assert list(scores) == ["boolq", "winogrande", "arc_easy", "piqa", "mean"]  # paper column order
    assert scores["arc_easy"] == 0.6 and scores["piqa"] == 0.8  # acc_norm where it exists
    assert scores["boolq"] == 0.7 and scores["winogrande"] == 0.4  # else acc
    assert scores["mean"] == pytest.approx((0.6 + 0.7 + 0.4 + 0.8) / 4)  # unweighted, whatever the sizes
    assert info["n"]["arc_easy"] == 100


def test_mmlu_weighted_by_question_count():
    raw = {
        "results": {"mmlu_anatomy": {"acc,none": 0.5}, "mmlu_virology": {"acc,none": 0.2}},
        "n-samples": {"mmlu_anatomy": {"effective": 30}, "mmlu_virology": {"effective": 10}},
    }
    out = zs.summarize_mmlu(raw)
    assert out["acc"] == pytest.approx((0.5 * 30 + 0.2 * 10) / 40)
    assert out["n"] == 40 and out["subjects"]["virology"] == {"acc": 0.2, "n": 10}


def test_mmlu_subject_files_split_exactly(shared_data, tmp_path):
    files = zs.mmlu_subject_files(shared_data, cache_dir=tmp_path)
    assert set(files) == set(zs.MMLU_SUBJECTS) and len(zs.MMLU_SUBJECTS) == 57
    n_test = n_dev = 0
    for s, f in files.items():
        test, dev = _rows(f["test"], 10**6), _rows(f["dev"], 10**6)
        assert {r["subject"] for r in test} == {s} == {r["subject"] for r in dev}
        assert len(dev) == 5
        n_test += len(test)
        n_dev += len(dev)
    assert (n_test, n_dev) == (14042, 285)
    assert set(zs.OATS_MMLU_SUBJECTS) <= set(zs.MMLU_SUBJECTS) and len(zs.OATS_MMLU_SUBJECTS) == 10


def test_mmlu_offline_five_shot_prompt_uses_dev_examples(tiny_lm, shared_data, monkeypatch, tmp_path):
    monkeypatch.setenv("OATS_CACHE_DIR", str(tmp_path))
    raw = zs.run_lm_eval(tiny_lm, zs.mmlu_task_configs(["astronomy"], shared_data), limit=2, num_fewshot=5,
                         offline=True, log_samples=True)
    dev = [r for r in _rows(shared_data / "tasks" / "mmlu" / "dev.jsonl.gz", 10**6) if r["subject"] == "astronomy"]
    context = raw["samples"]["mmlu_astronomy"][0]["arguments"][0][0]
    assert context.startswith("The following are multiple choice questions (with answers) about astronomy.")
    assert all(r["question"].strip() in context for r in dev)  # first_n sampler: all 5 dev examples
    assert context.count("\nAnswer:") == 6
    assert zs.summarize_mmlu(raw)["n"] == 2


def test_config_validates_task_and_subject_names():
    from oats.config import ConfigError, resolve

    cfg = resolve({"model": "smollm2-135m", "zero_shot_tasks": ["boolq", "mmlu"], "mmlu_subjects": list(zs.OATS_MMLU_SUBJECTS)})
    assert cfg.zero_shot_tasks == ["boolq", "mmlu"]
    with pytest.raises(ConfigError, match=r"zero_shot_tasks.*'hellaswag2'.*allowed values.*'boolq'"):
        resolve({"model": "smollm2-135m", "zero_shot_tasks": ["hellaswag2"]})
    with pytest.raises(ConfigError, match=r"mmlu_subjects.*'astrology'"):
        resolve({"model": "smollm2-135m", "mmlu_subjects": ["astrology"]})


def test_missing_local_file_names_what_to_fix(tmp_path):
    (tmp_path / "tasks").mkdir()
    with pytest.raises(zs.TaskDataError, match="boolq.*validation.jsonl"):
        zs.local_task_config("boolq", tmp_path)


def test_smollm2_dense_offline_accuracies(smollm2, shared_data):
    """The acceptance tasks run from the local files on the real model and give accuracies (small limit)."""
    model, tok = smollm2
    tasks = ["arc_easy", "piqa", "boolq", "winogrande", "rte", "openbookqa", "arc_challenge"]
    raw = zs.run_lm_eval(zs.make_lm(model, tok, 8), zs.task_entries(tasks, shared_data), limit=2, num_fewshot=0, offline=True)
    scores, info = zs.summarize_zero_shot(raw)
    assert set(scores) == set(tasks) | {"mean"}
    assert all(0.0 <= v <= 1.0 for v in scores.values())
    assert all(info["n"][t] == 2 for t in tasks)


def test_compare_tool_reads_two_records_and_prints_points(tmp_path, capsys, monkeypatch):
    from tools import compare_zero_shot

    for name, bits in (("a", "1101"), ("b", "1001")):
        (tmp_path / name).mkdir()
        rec = {"metrics": {"zero_shot_info": {"per_example": {"rte": bits}}}}
        (tmp_path / name / "result.json").write_text(json.dumps(rec))
    monkeypatch.setattr("sys.argv", ["compare_zero_shot", str(tmp_path / "a"), str(tmp_path / "b" / "result.json")])
    compare_zero_shot.main()
    out = capsys.readouterr().out
    assert "| rte | 4 | 75.0 | 50.0 | +25.00 | 25.00 |" in out  # d = 0,1,0,0: std 0.5, se 0.25
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "result.json").write_text(json.dumps({"metrics": {"zero_shot": {"rte": 0.5}}}))
    monkeypatch.setattr("sys.argv", ["compare_zero_shot", str(tmp_path / "a"), str(tmp_path / "c")])
    with pytest.raises(SystemExit, match="per_example"):
        compare_zero_shot.main()
    (tmp_path / "a2").mkdir()
    (tmp_path / "a2" / "result.json").write_text(json.dumps({"metrics": {"zero_shot_info": {"per_example": {"rte": "0101"}}}}))
    monkeypatch.setattr("sys.argv", ["compare_zero_shot", str(tmp_path / "a"), str(tmp_path / "a2"), str(tmp_path / "b")])
    compare_zero_shot.main()
    out = capsys.readouterr().out
    # seeds 1101 and 0101 average to 0.5, 1, 0, 1 against 1001: d = -0.5, 1, 0, 0, mean 0.125
    assert "| rte | 4 | 62.5 | 50.0 | +12.50 |" in out
    assert "Mean difference of each of the 2 records: +25.00, +0.00; standard error over them 12.50." in out
    rec = {"metrics": {"zero_shot_info": {"per_example": {"rte": "1101", "boolq": "1111"}}}}
    (tmp_path / "a" / "result.json").write_text(json.dumps(rec))
    rec["metrics"]["zero_shot_info"]["per_example"] = {"rte": "1001", "boolq": "0000"}
    (tmp_path / "b" / "result.json").write_text(json.dumps(rec))
    monkeypatch.setattr("sys.argv", ["compare_zero_shot", str(tmp_path / "a"), str(tmp_path / "b"), "--exclude", "boolq"])
    compare_zero_shot.main()
    out = capsys.readouterr().out
    assert "| boolq |" not in out and "| mean of 1 (without boolq) | | | | +25.00 |" in out
    monkeypatch.setattr("sys.argv", ["compare_zero_shot", str(tmp_path / "a"), str(tmp_path / "b"), "--exclude", "bolq"])
    with pytest.raises(SystemExit, match=r"exclude names \['bolq'\]"):
        compare_zero_shot.main()
