"""Where each corpus's documents come from: the hub, a local directory, or CPython itself.

``load_docs(name, split, data_dir)`` returns the split's rows (a list of strings) in the order the
hub data set has them. Splits are ``train`` (calibration) and ``test`` (evaluation).
"""
from __future__ import annotations

import logging
import os
from functools import lru_cache
from pathlib import Path

from data.files import DATA_ENV, read_jsonl

log = logging.getLogger(__name__)

DATASET_NAMES = ("pydoc", "wikitext2", "c4", "ptb")

# How a split's rows are joined into one token stream (the Wanda/SparseGPT conventions).
JOINERS = {"pydoc": "\n\n", "wikitext2": "\n\n", "c4": " ", "ptb": " "}
# Wanda samples calibration windows inside single long C4 documents; the others sample a joined stream.
PER_DOCUMENT_SAMPLING = {"c4"}
# Wanda's C4 perplexity uses the first 1100 validation documents.
C4_EVAL_DOCS = 1100
# The 300-document C4 stand-in of ../shared/data is split: first 200 calibration, last 100 evaluation.
C4_SAMPLE_FILE = "c4_demo_300docs.jsonl.gz"
C4_SAMPLE_TRAIN = 200


class DataError(RuntimeError):
    """A data set could not be found or loaded; the message says what to fix."""


def resolve_data_dir(data_dir: str | None) -> Path | None:
    """The local data root: the config's ``data_dir``, else env ``OATS_DATA_DIR``, else None (hub)."""
    root = data_dir or os.environ.get(DATA_ENV)
    if not root:
        return None
    path = Path(root).expanduser()
    if not path.is_dir():
        src = "config key 'data_dir'" if data_dir else "env OATS_DATA_DIR"
        raise DataError(f"{src} points to {str(path)!r}, which is not a directory")
    return path


def _first_existing(root: Path, candidates: list[str], what: str) -> Path:
    for c in candidates:
        if (root / c).is_file():
            return root / c
    raise DataError(
        f"{what}: none of {[str(root / c) for c in candidates]} exists; "
        f"lay out the data directory like ../shared/data/ or unset data_dir / OATS_DATA_DIR to use the hub"
    )


def _pydoc_docs(split: str) -> list[str]:
    """CPython's pydoc topics, sorted by name, duplicate texts dropped; every 5th (index % 5 == 0) is the test split."""
    from pydoc_data.topics import topics

    docs = list(dict.fromkeys(topics[k] for k in sorted(topics)))
    if split == "test":
        return [d for i, d in enumerate(docs) if i % 5 == 0]
    return [d for i, d in enumerate(docs) if i % 5 != 0]


def _wikitext_local(root: Path, split: str) -> list[str]:
    base = root / "wikitext2" / "wikitext-2-raw-v1"
    raw = {"test": "wiki.test.raw", "train": "wiki.train.raw", "validation": "wiki.valid.raw"}[split]
    path = _first_existing(base, [f"{split}.jsonl.gz", f"{split}.jsonl", raw], f"wikitext2 {split} split")
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        return read_jsonl(path, "text")
    # Raw file: one HF row per line; non-empty rows keep their '\n', blank lines are ''.
    with open(path, encoding="utf-8", newline="") as f:
        return [line if line.strip() else "" for line in f]


def _c4_local(root: Path, split: str) -> list[str]:
    base = root / "c4"
    shard = "c4-train.00000-of-01024.json.gz" if split == "train" else "c4-validation.00000-of-00008.json.gz"
    for name in (shard, shard.replace(".json.gz", ".jsonl.gz")):
        if (base / name).is_file():
            return read_jsonl(base / name, "text")
    if (base / C4_SAMPLE_FILE).is_file():
        docs = read_jsonl(base / C4_SAMPLE_FILE, "text")
        log.warning("c4: shard %s missing; using the %d-document stand-in %s (%s part)", shard, len(docs), C4_SAMPLE_FILE, split)
        return docs[:C4_SAMPLE_TRAIN] if split == "train" else docs[C4_SAMPLE_TRAIN:]
    raise DataError(f"c4 {split}: neither {base / shard} nor {base / C4_SAMPLE_FILE} exists")


def _ptb_local(root: Path, split: str) -> list[str]:
    # SparseGPT evaluates PTB on its validation split.
    name = "validation" if split == "test" else "train"
    path = _first_existing(root / "ptb", [f"{name}.jsonl.gz", f"{name}.jsonl"], f"ptb {name} split")
    return read_jsonl(path, "sentence")


def _hub(name: str, split: str) -> list[str]:
    try:
        import datasets
    except ImportError as e:  # pragma: no cover
        raise DataError("the `datasets` package is needed to load from the hub; pip install datasets") from e
    try:
        if name == "wikitext2":
            return list(datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"])
        if name == "c4":
            files = {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"}
            hub_split = "train" if split == "train" else "validation"
            ds = datasets.load_dataset("allenai/c4", data_files={hub_split: files[hub_split]}, split=hub_split)
            return list(ds["text"])
        if name == "ptb":
            return list(datasets.load_dataset("ptb_text_only", "penn_treebank", split="train" if split == "train" else "validation")["sentence"])
    except Exception as e:
        raise DataError(
            f"could not load {name!r} ({split}) from the Hugging Face hub ({type(e).__name__}: {str(e)[:200]}); "
            f"offline, set config key 'data_dir' (or env OATS_DATA_DIR) to a directory laid out like ../shared/data/"
        ) from e
    raise DataError(f"unknown data set {name!r}; allowed values: {list(DATASET_NAMES)}")


@lru_cache(maxsize=16)
def _load_docs_cached(name: str, split: str, root: str | None) -> tuple[str, ...]:
    if name == "pydoc":
        return tuple(_pydoc_docs(split))
    if root is None:
        return tuple(_hub(name, split))
    local = {"wikitext2": _wikitext_local, "c4": _c4_local, "ptb": _ptb_local}[name]
    return tuple(local(Path(root), split))


def load_docs(name: str, split: str, data_dir: str | None = None) -> list[str]:
    """Rows of ``name``'s ``split`` ('train' or 'test'). Raises DataError with what to fix."""
    if name not in DATASET_NAMES:
        raise DataError(f"unknown data set {name!r}; allowed values: {list(DATASET_NAMES)}")
    if split not in ("train", "test"):
        raise DataError(f"split {split!r}; allowed: 'train', 'test'")
    root = resolve_data_dir(data_dir) if name != "pydoc" else None
    return list(_load_docs_cached(name, split, str(root) if root else None))


def corpus_fingerprint(name: str, split: str, data_dir: str | None = None) -> dict[str, object]:
    """{'docs': count, 'chars': total characters, 'sha256': of the rows joined} of a split: a record keeps
    it so that a corpus that changed under it (pydoc differs between Python versions) marks it stale."""
    import hashlib

    docs = load_docs(name, split, data_dir)
    h = hashlib.sha256()
    for d in docs:
        h.update(d.encode("utf-8"))
        h.update(b"\0")
    return {"docs": len(docs), "chars": sum(len(d) for d in docs), "sha256": h.hexdigest()[:16]}
