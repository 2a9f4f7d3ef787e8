"""Download every corpus and zero-shot task file once, on a machine with internet, into the local
layout that ``data.sources`` and ``eval.zero_shot`` read offline (the layout of ../shared/data/).

    python -m data.download --to /scratch/oats-data                    # everything
    python -m data.download --to DIR --only wikitext2 ptb              # some groups
    python -m data.download --to DIR --only tasks --tasks boolq,mmlu   # some tasks

Then set config key ``data_dir: DIR`` (or env ``OATS_DATA_DIR=DIR``) on the offline machine.

What is written (gzip jsonl, one hub row per line, hub row order, all hub fields kept)::

    DIR/wikitext2/wikitext-2-raw-v1/{train,validation,test}.jsonl.gz   wikitext, wikitext-2-raw-v1   (text)
    DIR/c4/c4-train.00000-of-01024.json.gz                              allenai/c4, en shard 0 train  (text)
    DIR/c4/c4-validation.00000-of-00008.json.gz                         allenai/c4, en shard 0 valid. (text)
    DIR/ptb/{train,validation}.jsonl.gz                                 ptb_text_only, penn_treebank  (sentence)
    DIR/tasks/<task>/<split>.jsonl.gz                                   lm_eval 0.4.13's dataset_path/name
    DIR/tasks/mmlu/{test,dev}.jsonl.gz                                  cais/mmlu 'all' (with `subject`)

The C4 shard files keep the hub's file names (their content is jsonl in gzip, as on the hub). Each file is
written atomically (``data.files.atomic_write``); a file that already exists is skipped, so an interrupted
run resumes where it stopped (``--overwrite`` downloads again). The hub is reached only through
:func:`hub_load_dataset` (or the ``load_dataset`` argument of :func:`download`), which tests replace.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gzip
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from data.files import DATA_ENV, atomic_write

log = logging.getLogger(__name__)

GROUPS = ("wikitext2", "c4", "ptb", "tasks")
TASK_NAMES = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "piqa", "mmlu")
C4_SHARDS = {"train": "c4-train.00000-of-01024.json.gz", "validation": "c4-validation.00000-of-00008.json.gz"}


class DownloadError(RuntimeError):
    """A file could not be fetched or is not what the readers expect; the message says which and why."""


@dataclass(frozen=True)
class HubSource:
    """One ``datasets.load_dataset`` call: ``load_dataset(path, name, split=split, **kwargs)``."""

    path: str
    name: str | None
    split: str
    kwargs: tuple[tuple[str, Any], ...] = ()

    def describe(self) -> str:
        extra = "".join(f" {k}={v!r}" for k, v in self.kwargs)
        return f"{self.path}" + (f" {self.name}" if self.name else "") + f" [{self.split}]" + extra


@dataclass(frozen=True)
class FileSpec:
    """One output file: where it goes (relative to the data root), the hub sources tried in order (the
    first that loads wins; later ones are fallbacks for renamed or script-only hub repos), and the
    fields every row must have for the offline readers."""

    group: str  # one of GROUPS
    rel: str  # path under the data root
    sources: tuple[HubSource, ...]
    fields: tuple[str, ...]
    task: str | None = None
    kind: str = field(default="corpus")  # "corpus" | "task"


def _ptb_sources(split: str) -> tuple[HubSource, ...]:
    # `ptb_text_only` is what data.sources loads online; on the hub it now lives at ptb-text-only/ptb_text_only
    # and is a loading-script repo, so datasets >= 4 needs the hub's parquet conversion branch.
    return (
        HubSource("ptb_text_only", "penn_treebank", split),
        HubSource("ptb-text-only/ptb_text_only", "penn_treebank", split),
        HubSource("ptb-text-only/ptb_text_only", "penn_treebank", split, (("revision", "refs/convert/parquet"),)),
        HubSource("ptb-text-only/ptb_text_only", None, split,
                  (("revision", "refs/convert/parquet"), ("data_dir", "penn_treebank"))),
    )


def _corpus_specs() -> list[FileSpec]:
    specs = [
        FileSpec("wikitext2", f"wikitext2/wikitext-2-raw-v1/{s}.jsonl.gz",
                 (HubSource("wikitext", "wikitext-2-raw-v1", s), HubSource("Salesforce/wikitext", "wikitext-2-raw-v1", s)),
                 ("text",))
        for s in ("train", "validation", "test")
    ]
    specs += [
        FileSpec("c4", f"c4/{shard}",
                 (HubSource("allenai/c4", None, s, (("data_files", {s: f"en/{shard}"}),)),), ("text",))
        for s, shard in C4_SHARDS.items()
    ]
    specs += [FileSpec("ptb", f"ptb/{s}.jsonl.gz", _ptb_sources(s), ("sentence",)) for s in ("train", "validation")]
    return specs


# Per task: (lm_eval 0.4.13 dataset_path, dataset_name, [(split evaluated/few-shot, local file stem)], fields).
# From the installed lm_eval/tasks YAMLs eval.zero_shot.TASK_SPECS points at: super_glue/boolq/default.yaml,
# super_glue/rte/default.yaml, hellaswag/hellaswag.yaml, winogrande/default.yaml, arc/arc_{easy,challenge}.yaml,
# openbookqa/openbookqa.yaml, piqa/piqa.yaml, mmlu/default/_default_template_yaml (test_split test, fewshot dev).
TASK_HUB: dict[str, tuple[str, str | None, tuple[str, ...], tuple[str, ...]]] = {
    "boolq": ("aps/super_glue", "boolq", ("validation",), ("question", "passage", "label")),
    "rte": ("aps/super_glue", "rte", ("validation",), ("premise", "hypothesis", "label")),
    "hellaswag": ("Rowan/hellaswag", None, ("validation",), ("activity_label", "ctx_a", "ctx_b", "endings", "label")),
    "winogrande": ("allenai/winogrande", "winogrande_xl", ("validation",), ("sentence", "option1", "option2", "answer")),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy", ("test",), ("question", "choices", "answerKey")),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge", ("test",), ("question", "choices", "answerKey")),
    "openbookqa": ("allenai/openbookqa", "main", ("test",), ("question_stem", "choices", "answerKey")),
    "piqa": ("baber/piqa", None, ("validation",), ("goal", "sol1", "sol2", "label")),
    # lm_eval loads one config per subject; the 'all' config is the same rows, subjects concatenated, with
    # the `subject` field eval.zero_shot.mmlu_subject_files splits on.
    "mmlu": ("cais/mmlu", "all", ("test", "dev"), ("question", "subject", "choices", "answer")),
}


def _task_specs(tasks: Iterable[str]) -> list[FileSpec]:
    out = []
    for t in tasks:
        path, name, splits, fields = TASK_HUB[t]
        for s in splits:
            out.append(FileSpec("tasks", f"tasks/{t}/{s}.jsonl.gz", (HubSource(path, name, s),), fields, task=t, kind="task"))
    return out


def plan(only: Sequence[str] | None = None, tasks: Sequence[str] | None = None) -> list[FileSpec]:
    """The files :func:`download` writes for groups ``only`` (default all of GROUPS) and zero-shot
    ``tasks`` (default all of TASK_NAMES; used only when 'tasks' is among the groups)."""
    groups = list(only) if only else list(GROUPS)
    bad = [g for g in groups if g not in GROUPS]
    if bad:
        raise DownloadError(f"unknown data group(s) {bad}; allowed: {list(GROUPS)}")
    task_list = list(tasks) if tasks else list(TASK_NAMES)
    bad = [t for t in task_list if t not in TASK_NAMES]
    if bad:
        raise DownloadError(f"unknown task(s) {bad}; allowed: {list(TASK_NAMES)}")
    specs = [s for s in _corpus_specs() if s.group in groups]
    if "tasks" in groups:
        specs += _task_specs(dict.fromkeys(task_list))
    return specs


def hub_load_dataset(path: str, name: str | None = None, **kwargs: Any):
    """``datasets.load_dataset`` (imported here, so only downloading needs ``datasets``). Tests replace this."""
    try:
        import datasets
    except ImportError as e:  # pragma: no cover
        raise DownloadError("downloading needs the `datasets` package: pip install datasets") from e
    return datasets.load_dataset(path, name, **kwargs)


def _json_default(o: Any) -> Any:
    if isinstance(o, (_dt.datetime, _dt.date, _dt.time)):
        return o.isoformat()
    if hasattr(o, "tolist"):  # numpy scalars / arrays
        return o.tolist()
    if isinstance(o, bytes):
        return o.decode("utf-8")
    raise TypeError(f"cannot write {type(o).__name__} as JSON")


def _iter_rows(ds: Any, batch_size: int = 1000) -> Iterator[dict[str, Any]]:
    """Rows of a ``datasets.Dataset`` (read in batches, which is much faster than row by row), or of any
    iterable of dicts."""
    if hasattr(ds, "iter") and hasattr(ds, "column_names"):
        for batch in ds.iter(batch_size=batch_size):
            cols = list(batch)
            for vals in zip(*(batch[c] for c in cols)):
                yield dict(zip(cols, vals))
    else:
        yield from ds


def _check_fields(spec: FileSpec, ds: Any) -> None:
    cols = getattr(ds, "column_names", None)
    if cols is None:
        return
    missing = [f for f in spec.fields if f not in cols]
    if missing:
        raise DownloadError(f"{spec.rel}: the hub data has columns {list(cols)}, not the {missing} the offline readers need")


def _write_gzip_jsonl(path: Path, rows: Iterable[dict[str, Any]], fields: Sequence[str], progress=None) -> int:
    """Write ``rows`` as gzip jsonl to ``path`` atomically; return the row count. The gzip header carries
    no time stamp, so the same rows give the same bytes."""
    count = 0

    def write(tmp: str) -> None:
        nonlocal count
        with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
            for row in rows:
                missing = [f for f in fields if f not in row]
                if missing:
                    raise DownloadError(f"{path}: row {count} lacks field(s) {missing}")
                gz.write((json.dumps(row, ensure_ascii=False, default=_json_default) + "\n").encode("utf-8"))
                count += 1
                if progress is not None:
                    progress.update(1)

    atomic_write(path, write)
    return count


def _load_first(spec: FileSpec, load_dataset: Callable[..., Any]) -> tuple[Any, HubSource]:
    errors = []
    for src in spec.sources:
        try:
            return load_dataset(src.path, src.name, split=src.split, **dict(src.kwargs)), src
        except Exception as e:  # try the next source; report all if none loads
            errors.append(f"{src.describe()}: {type(e).__name__}: {str(e)[:300]}")
    raise DownloadError(f"{spec.rel}: no hub source loaded:\n  " + "\n  ".join(errors))


def _progress(total: int | None, desc: str, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc=desc, unit="row", leave=False, disable=not enabled)


def download(
    to: str | Path,
    only: Sequence[str] | None = None,
    tasks: Sequence[str] | None = None,
    *,
    load_dataset: Callable[..., Any] | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
    echo: Callable[[str], None] = print,
) -> Path:
    """Fetch the files of :func:`plan` (``only`` groups, ``tasks``) into data root ``to``; return it resolved.

    ``load_dataset(path, name, split=..., **kwargs)`` defaults to :func:`hub_load_dataset`. Existing files
    are skipped unless ``overwrite``. One line per file goes to ``echo`` (row counts, source, size);
    ``progress`` (default: stderr is a terminal) shows a tqdm bar while a file is written. Raises
    DownloadError, naming every file that failed, after trying all of them."""
    root = Path(to).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    loader = load_dataset or hub_load_dataset
    show = sys.stderr.isatty() if progress is None else progress
    specs = plan(only, tasks)
    failed: list[str] = []
    for i, spec in enumerate(specs, 1):
        out = root / spec.rel
        head = f"[{i}/{len(specs)}] {spec.rel}"
        if out.is_file() and not overwrite:
            echo(f"{head}: exists, skipped")
            continue
        try:
            ds, src = _load_first(spec, loader)
            _check_fields(spec, ds)
            total = len(ds) if hasattr(ds, "__len__") else None
            bar = _progress(total, spec.rel, show)
            try:
                n = _write_gzip_jsonl(out, _iter_rows(ds), spec.fields, bar)
            finally:
                if bar is not None:
                    bar.close()
        except Exception as e:
            msg = str(e)
            failed.append(msg if msg.startswith(spec.rel) else f"{spec.rel}: {type(e).__name__}: {msg}")
            echo(f"{head}: FAILED ({type(e).__name__}: {str(e)[:300]})")
            continue
        echo(f"{head}: {n} rows from {src.describe()}, {out.stat().st_size / 1e6:.1f} MB")
    if failed:
        raise DownloadError(f"{len(failed)} of {len(specs)} file(s) failed (rerun to retry them; the others are kept):\n"
                            + "\n".join(failed))
    echo(f"done. Offline, set config key  data_dir: {root}   (or env {DATA_ENV}={root})")
    return root


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data.download", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--to", required=True, help="data root to fill (later: config key data_dir / env OATS_DATA_DIR)")
    p.add_argument("--only", nargs="+", choices=GROUPS, metavar="GROUP",
                   help=f"groups to fetch, any of {' '.join(GROUPS)} (default: all)")
    p.add_argument("--tasks", help=f"comma-separated zero-shot tasks for group 'tasks' (default: {','.join(TASK_NAMES)})")
    p.add_argument("--overwrite", action="store_true", help="download files that already exist again")
    p.add_argument("--list", action="store_true", help="print the files and hub sources, download nothing")
    args = p.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    try:
        if args.list:
            for spec in plan(args.only, tasks):
                print(f"{spec.rel}  <-  " + "  |  ".join(s.describe() for s in spec.sources))
            return 0
        download(args.to, args.only, tasks, overwrite=args.overwrite)
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
