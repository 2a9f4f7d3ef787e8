"""The quality table of ``configs/smollm2_quality.py``: one row per configuration, mean ± std over seeds.

    python -m tools.report_quality results/quality            # writes results/quality/report/quality.{md,csv}

Records that differ only in ``seed`` and ``name`` are one row (``eval.aggregate.group_by_seed``), compared
on the keys the config hash covers (a key added later and left at its default does not split a row); the
zero-shot keys are ignored for that grouping too, since they add metrics without changing the compressed
model (a seed-1 row that also ran the zero-shot suite stays in its group; its zero-shot columns then say
n=1). Columns: the row, its method label, compression setting, achieved sparsity, WikiText-2 perplexity
(mean ± sample std, n), the per-seed values, and the compression seconds (mean; the streamed pass:
statistics, method, weight and block updates, next inputs). A second table gives the zero-shot accuracies
of the rows that have them.
"""
from __future__ import annotations

import csv
import io
import sys
from pathlib import Path
from typing import Any, Sequence

from data.files import atomic_write_text
from eval.aggregate import IGNORED_KEYS, group_by_seed, mean_std
from eval.report import compression_label, record_label
from oats.config import experiment_keys
from oats.records import all_records

ZERO_SHOT_KEYS = ("zero_shot_tasks", "zero_shot_limit", "zero_shot_batch_size", "zero_shot_fewshot")
SETTING_ORDER = {"0": 0, "0.5": 1, "0.7": 2, "0.5 (2:4)": 3}


def quality_rows(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """group_by_seed rows, each with 'label' and 'setting', ordered by setting then mean perplexity."""
    by_name = {r["name"]: r for r in records}
    rows = group_by_seed(records, ignore=IGNORED_KEYS + ZERO_SHOT_KEYS, canonical=experiment_keys)
    for row in rows:
        first = by_name.get(row["names"][0]) if row["names"] else None
        row["label"] = record_label(first) if first else row["name"]
        row["setting"] = compression_label(first) if first else "?"
    ppl = lambda r: (r["metrics"].get("ppl.wikitext2") or {}).get("mean") or float("inf")  # noqa: E731
    return sorted((r for r in rows if r["n"]), key=lambda r: (SETTING_ORDER.get(r["setting"], 9), ppl(r)))


def _values(m: dict[str, Any] | None) -> str:
    return ", ".join(f"{v:.2f}" for v in m["values"]) if m else ""


def _mean(m: dict[str, Any] | None, digits: int = 0) -> str:
    return f"{m['mean']:.{digits}f}" if m and m["mean"] is not None else ""


def quality_markdown(rows: Sequence[dict[str, Any]]) -> str:
    head = ["row", "method", "compression", "achieved", "WikiText-2 ppl (mean ± std, n)", "per seed", "compression s"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---|---:|---:|---|---:|"]
    for r in rows:
        m = r["metrics"]
        lines.append(f"| `{r['name']}` | {r['label']} | {r['setting']} | {_mean(m.get('achieved_sparsity'), 4)} | "
                     f"{mean_std(m['ppl.wikitext2']) if 'ppl.wikitext2' in m else 'n/a'} | {_values(m.get('ppl.wikitext2'))} | "
                     f"{_mean(m.get('timings.compression'))} |")
    return "\n".join(lines) + "\n"


def zero_shot_markdown(rows: Sequence[dict[str, Any]]) -> str | None:
    tasks = sorted({k.split(".", 1)[1] for r in rows for k in r["metrics"] if k.startswith("zero_shot.") and k.count(".") == 1} - {"mean"})
    zs = [r for r in rows if any(f"zero_shot.{t}" in r["metrics"] for t in tasks)]
    if not zs:
        return None
    lines = ["| row | " + " | ".join(tasks) + " | mean |", "|---|" + "---:|" * (len(tasks) + 1)]
    for r in zs:
        cells = [_pct(r["metrics"].get(f"zero_shot.{t}")) for t in tasks + ["mean"]]
        lines.append(f"| `{r['name']}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _pct(m: dict[str, Any] | None) -> str:
    """A zero-shot accuracy (a fraction in the record) as a percentage."""
    return f"{100.0 * m['mean']:.1f}" if m and m["mean"] is not None else ""


def quality_csv(rows: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["row", "method", "compression", "achieved", "ppl_mean", "ppl_std", "n", "ppl_values", "compress_s_mean"])
    for r in rows:
        m = r["metrics"]
        p = m.get("ppl.wikitext2") or {"mean": None, "std": None, "n": 0, "values": []}
        w.writerow([r["name"], r["label"], r["setting"], _mean(m.get("achieved_sparsity"), 4), p["mean"], p["std"], p["n"],
                    " ".join(f"{v:.4f}" for v in p["values"]), _mean(m.get("timings.compression"), 1)])
    return buf.getvalue()


def main(argv: Sequence[str]) -> None:
    root = Path(argv[0] if argv else "results/quality")
    rows = quality_rows(all_records(root))
    md = quality_markdown(rows)
    zs = zero_shot_markdown(rows)
    atomic_write_text(root / "report" / "quality.md", md + ("\n" + zs if zs else ""))
    atomic_write_text(root / "report" / "quality.csv", quality_csv(rows))
    print(md)
    if zs:
        print(zs)


if __name__ == "__main__":
    main(sys.argv[1:])
