"""Zero-shot accuracy of one result minus another, per task and for the mean, with the paired standard error.

    python -m tools.compare_zero_shot results/quality/<row>/result.json results/quality/dense/result.json
    python -m tools.compare_zero_shot results/quality/<row>-s1 results/quality/<row>-s2 results/quality/<row>-s3 \
        results/quality/dense --exclude boolq

The last record is subtracted from the others; several before it (a row's calibration seeds) are
averaged question by question. Every record needs ``metrics.zero_shot_info.per_example`` (written by
every zero-shot evaluation). The models answered the same questions, so the difference is judged by the
standard error of the per-question differences (paired), printed beside the one independent samples
would give; with several records, each one's mean difference and the standard error over them (the
seed-to-seed spread) follow the table. ``--exclude TASK`` (repeatable) leaves a task out of the table and
the mean. Prints Markdown in points (accuracy x 100).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from eval.zero_shot import paired_difference


def _info(path: str) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        p = p / "result.json"
    if not p.is_file():
        raise SystemExit(f"{path}: no result.json")
    info = json.loads(p.read_text()).get("metrics", {}).get("zero_shot_info")
    if not info or not info.get("per_example"):
        raise SystemExit(f"{p}: no metrics.zero_shot_info.per_example (evaluate it again with zero_shot_tasks)")
    return info


def table(diff: dict[str, Any], label_a: str, label_b: str, excluded: tuple[str, ...] = ()) -> str:
    """The :func:`eval.zero_shot.paired_difference` result as a Markdown table, in points."""
    lines = [f"| task | n | {label_a} | {label_b} | difference | paired se | unpaired se |", "|---|---:|---:|---:|---:|---:|---:|"]
    for t, v in diff["tasks"].items():
        lines.append(f"| {t} | {v['n']} | {100 * v['acc_a']:.1f} | {100 * v['acc_b']:.1f} | {100 * v['diff']:+.2f} "
                     f"| {100 * v['se']:.2f} | {100 * v['se_unpaired']:.2f} |")
    m = diff["mean"]
    without = f" (without {', '.join(excluded)})" if excluded else ""
    lines.append(f"| mean of {len(diff['tasks'])}{without} | | | | {100 * m['diff']:+.2f} | {100 * m['se']:.2f} | {100 * m['se_unpaired']:.2f} |")
    if "per_record" in m:
        each = ", ".join(f"{100 * x:+.2f}" for x in m["per_record"])
        lines += ["", f"Mean difference of each of the {len(m['per_record'])} records: {each}; "
                      f"standard error over them {100 * m['se_records']:.2f}."]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", nargs="+", help="result.json (or its folder) of the model whose accuracy comes first; "
                                        "several (a row's seeds) are averaged question by question")
    p.add_argument("b", help="result.json (or its folder) subtracted from it")
    p.add_argument("--exclude", action="append", default=[], metavar="TASK",
                   help="a task left out of the table and the mean (repeatable)")
    args = p.parse_args()
    infos = [_info(x) for x in args.a]
    excluded = tuple(args.exclude)
    try:
        diff = paired_difference(infos if len(infos) > 1 else infos[0], _info(args.b), exclude=excluded)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    print(table(diff, "a" if len(infos) == 1 else f"a (mean of {len(infos)})", "b", excluded))


if __name__ == "__main__":
    main()
