"""Result records on disk: one JSON per experiment, written atomically inside the experiment's own
folder, and a Markdown summary of all of them."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from data.files import atomic_write_text

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"


def experiment_dir(out_root: Path, name: str) -> Path:
    """``<out_root>/<name>``, proven to lie directly inside ``out_root`` (names are validated, this is the guard)."""
    root = Path(out_root)
    path = root / name
    if path.parent != root or name in ("", ".", "..") or "/" in name or "\\" in name:
        raise ValueError(f"experiment name {name!r} does not name a folder inside {root}")
    return path


def write_record(out_dir: Path, record: dict[str, Any]) -> Path:
    path = Path(out_dir) / RESULT_FILE
    atomic_write_text(path, json.dumps(record, indent=2, sort_keys=False, default=str) + "\n")
    return path


def read_record(out_dir: Path) -> dict[str, Any] | None:
    """The experiment's record, or None when there is none or it cannot be read as a record (a
    record that cannot be read is never taken as done)."""
    path = Path(out_dir) / RESULT_FILE
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        log.warning("%s cannot be read (%s); treated as not done", path, type(e).__name__)
        return None
    if not isinstance(rec, dict):
        log.warning("%s holds %s, not a record; treated as not done", path, type(rec).__name__)
        return None
    return rec


def all_records(root: Path) -> list[dict[str, Any]]:
    return [r for p in sorted(Path(root).glob(f"*/{RESULT_FILE}")) if (r := read_record(p.parent)) is not None]


def write_summary(root: Path) -> Path:
    from eval.report import summary_markdown

    path = Path(root) / "summary.md"
    atomic_write_text(path, "# Results\n\n" + summary_markdown(all_records(root)))
    return path


def report(results_root: Path) -> dict[str, Path]:
    """Gather every record under ``results_root`` and write the report to ``results_root/report/``."""
    from eval.report import write_report
    from oats.config import experiment_keys

    return write_report(all_records(Path(results_root)), Path(results_root) / "report", canonical=experiment_keys)
