"""lm_eval's ``wikitext`` word perplexity (the OATS reference's number), on- or offline.

lm_eval's task reads ``EleutherAI/wikitext_document_level`` (62 test documents, field ``page``),
detokenizes each page (``wikitext_detokenizer``), scores it with rolling loglikelihood windows of
``max_length`` tokens (each window predicts up to ``max_length`` new tokens, conditioned on the rest of
the window; the first window starts from the prefix token) and reports

    word_perplexity = exp(-sum_docs loglik / sum_docs words),   words = len(re.split(r"\\s+", page))

counted on the page *before* detokenization. This is a different quantity from the token perplexity of
``eval/perplexity.py`` (per word, not per token; documents scored separately; windows overlap-free but
restart at each document) and is always labelled as such.

Offline, the document-level view is rebuilt from the raw WikiText-2 test rows (:func:`wikitext_documents`)
and fed to lm_eval's own stock task config through the ``json`` loader, so the scoring code is lm_eval's.
The rolling window length is explicit: config key ``eval_seqlen`` (lm_eval's default would be the model's
maximum length, which differs between models).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Sequence

from data.files import cache_dir as data_cache_dir

log = logging.getLogger(__name__)

# A top-level WikiText heading row: " = Title = " (one '=' each side; sections are " = = Sec = = ").
_TOP_HEADING = re.compile(r"^ = [^=].* = $")
# How the original WikiText files write an empty line (the HF rows hold "" for it, see ../shared/data/README.md).
RAW_BLANK = " \n"


def is_top_heading(row: str) -> bool:
    """True for a top-level article title row such as ``" = Robert Boulter = \\n"``."""
    return bool(_TOP_HEADING.match(row.rstrip("\n")))


def wikitext_documents(rows: Sequence[str], blank: str = RAW_BLANK) -> list[str]:
    """Regroup WikiText rows (HF ``wikitext-2-raw-v1`` rows: text with its ``\\n``, or ``""`` when empty)
    into articles, as ``EleutherAI/wikitext_document_level`` holds them: every top-level heading row
    starts a new page; a page is its rows concatenated, empty rows written as ``blank`` (the raw file's
    ``" \\n"``). Rows before the first heading (the file's leading empty row) belong to no page.

    Returns the pages in file order (62 for the WikiText-2 test split)."""
    pages: list[list[str]] = []
    for row in rows:
        if is_top_heading(row):
            pages.append([])
        if pages:
            pages[-1].append(row if row.strip() else blank)
    return ["".join(p) for p in pages]


def word_count(page: str) -> int:
    """Words as lm_eval's wikitext ``process_results`` counts them (on the page before detokenization)."""
    return len(re.split(r"\s+", page))


def documents_file(docs: Sequence[str], cache_dir: Path | None = None) -> Path:
    """Write the pages as ``{"page": ...}`` jsonl into a content-addressed cache file (never the repo)."""
    blob = "\n".join(json.dumps({"page": d}) for d in docs) + "\n"
    key = hashlib.sha256(blob.encode()).hexdigest()[:16]
    root = Path(cache_dir or data_cache_dir("tasks"))
    path = root / f"wikitext_document_level-{key}" / "test.jsonl"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(blob, encoding="utf-8")
        os.replace(tmp, path)
    return path


def wikitext_task_config(docs_path: str | Path) -> dict[str, Any]:
    """lm_eval's stock ``wikitext`` task reading the rebuilt pages from a local jsonl file."""
    from eval.zero_shot import stock_task_config, with_local_files

    return with_local_files(stock_task_config("wikitext/wikitext.yaml"), {"test": str(docs_path)}, task="wikitext")


def word_perplexity(model, tokenizer, docs: Sequence[str] | None, max_length: int, batch_size: int = 1,
                    limit: int | None = None) -> dict[str, float]:
    """lm_eval ``wikitext`` metrics of ``model`` with rolling windows of ``max_length`` tokens.

    ``docs``: the pages (offline, e.g. :func:`wikitext_documents` of the test rows); None = the hub dataset.
    Returns {"word_perplexity", "byte_perplexity", "bits_per_byte", "documents", "max_length"}."""
    from eval.zero_shot import make_lm, run_lm_eval

    entry: str | dict[str, Any] = "wikitext" if docs is None else wikitext_task_config(documents_file(docs))
    lm = make_lm(model, tokenizer, batch_size, max_length=max_length)
    raw = run_lm_eval(lm, [entry], limit=limit, num_fewshot=0, offline=docs is not None)
    res = raw["results"]["wikitext"]
    return {
        "word_perplexity": float(res["word_perplexity,none"]),
        "byte_perplexity": float(res["byte_perplexity,none"]),
        "bits_per_byte": float(res["bits_per_byte,none"]),
        "documents": int(raw.get("n-samples", {}).get("wikitext", {}).get("effective", 0)),
        "max_length": max_length,
    }


def word_perplexity_metrics(model, tokenizer, cfg: Any) -> dict[str, Any]:
    """``metrics.word_ppl.wikitext`` for a config: local rows when ``data_dir`` is set, else the hub."""
    from data import load_docs, resolve_data_dir

    docs = wikitext_documents(load_docs("wikitext2", "test", cfg.data_dir)) if resolve_data_dir(cfg.data_dir) else None
    out = word_perplexity(model, tokenizer, docs, cfg.eval_seqlen, cfg.eval_batch_size)
    log.info("%s: wikitext word perplexity (lm_eval, rolling windows of %d) = %.3f", cfg.name, cfg.eval_seqlen, out["word_perplexity"])
    return {"wikitext": out}
