"""Result records on disk: one JSON per experiment, written atomically, and a Markdown summary."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

RESULT_FILE = "result.json"


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, fsync it, then rename it over
    ``path``: readers see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see ``atomic_write``)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_record(out_dir: Path, record: dict[str, Any]) -> Path:
    path = out_dir / RESULT_FILE
    atomic_write_text(path, json.dumps(record, indent=2, sort_keys=False, default=str) + "\n")
    return path


def read_record(out_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out_dir / RESULT_FILE).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def all_records(root: Path) -> list[dict[str, Any]]:
    return [r for p in sorted(Path(root).glob(f"*/{RESULT_FILE}")) if (r := read_record(p.parent)) is not None]


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.2f}" if abs(v) >= 1 else f"{v:.4f}"
    return str(v)


def summary_markdown(records: Iterable[dict[str, Any]]) -> str:
    """One row per experiment: method, sparsity, status, perplexities, times."""
    records = list(records)
    ppl_cols = sorted({k for r in records for k in (r.get("metrics", {}).get("ppl") or {})})
    extra = sorted({k for r in records for k in (r.get("metrics", {}).get("zero_shot") or {})})
    head = ["experiment", "model", "method", "sparsity", "type", "status", "achieved"]
    head += [f"ppl {c} (seqlen)" for c in ppl_cols] + extra + ["compress s", "total s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        c = r.get("config", {})
        m = r.get("metrics", {}) or {}
        t = r.get("timings", {}) or {}
        method = c.get("method", "?")
        if c.get("layerwise", "uniform") != "uniform":
            method = f"{c['layerwise'].upper()} + {method}"
        if c.get("update", "none") != "none":
            method = f"{method} + {c['update'].upper()}"
        row = [
            c.get("name", "?"),
            str(c.get("model", "?")),
            method,
            "0" if c.get("method") == "dense" else _fmt(c.get("sparsity")),
            c.get("sparsity_type", ""),
            r.get("status", "?"),
            _fmt(r.get("achieved_sparsity")),
        ]
        row += [f"{_fmt((m.get('ppl') or {}).get(col))} ({c.get('eval_seqlen')})" if col in (m.get("ppl") or {}) else "–" for col in ppl_cols]
        row += [_fmt((m.get("zero_shot") or {}).get(k)) for k in extra]
        row += [_fmt(t.get("compression")), _fmt(t.get("total"))]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def write_summary(root: Path) -> Path:
    path = Path(root) / "summary.md"
    atomic_write_text(path, "# Results\n\n" + summary_markdown(all_records(root)))
    return path
