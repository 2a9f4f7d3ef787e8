"""Seed aggregation of result records: one row per configuration, mean ± sample std over seeds.

A record is the dict written to ``result.json`` (``oats.runner``): ``name``, ``status``, ``config``
(every config key, ``seed`` among them), ``metrics`` (``ppl.<dataset>``, ``zero_shot.<task>``, ...),
``achieved_sparsity``, ``timings``. Records whose configs differ only in ``seed`` (and ``name``) are
the same experiment under another calibration draw: :func:`group_by_seed` merges them into one row
holding, for every numeric metric, the mean, the sample standard deviation (ddof = 1; None for a
single run) and n. Failed records (``status`` != 'ok') never enter a mean; they are counted in their
group's ``n_failed``. Pure functions of plain dicts: no imports from the rest of the project.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

IGNORED_KEYS = ("seed", "name")  # config keys that may differ inside a group
_SEED_SUFFIX = re.compile(r"-s\d+$")


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """{'mean', 'std', 'n'} of ``values``: sample std (ddof = 1), None when n < 2; mean None when n = 0."""
    vals = [float(v) for v in values]
    n = len(vals)
    if n == 0:
        return {"mean": None, "std": None, "n": 0}
    mean = math.fsum(vals) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std, "n": n}


def mean_std(values: Sequence[float] | Mapping[str, Any], digits: int = 2) -> str:
    """'58.23 ± 1.20 (n=3)'; one value: '58.23 (n=1)'; none: 'n/a'. Accepts values or a :func:`summarize` dict."""
    s = values if isinstance(values, Mapping) else summarize(values)
    if not s["n"]:
        return "n/a"
    if s["std"] is None:
        return f"{s['mean']:.{digits}f} (n={s['n']})"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f} (n={s['n']})"


def _numeric_leaves(obj: Any, prefix: str, out: dict[str, float]) -> None:
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        out[prefix] = float(obj)
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            _numeric_leaves(v, f"{prefix}.{k}" if prefix else str(k), out)


def record_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """Every numeric leaf of a record's results by dotted path: 'ppl.wikitext2', 'zero_shot.boolq',
    'achieved_sparsity', 'timings.compress', ... (nested dicts such as ``zero_shot_info`` contribute
    their numeric leaves; strings, lists and booleans are skipped)."""
    out: dict[str, float] = {}
    _numeric_leaves(record.get("metrics") or {}, "", out)
    if isinstance(record.get("achieved_sparsity"), (int, float)) and not isinstance(record.get("achieved_sparsity"), bool):
        out["achieved_sparsity"] = float(record["achieved_sparsity"])
    _numeric_leaves(record.get("timings") or {}, "timings", out)
    return out


Canonical = Callable[[Mapping[str, Any]], Mapping[str, Any]]


def config_key(config: Mapping[str, Any], ignore: Iterable[str] = IGNORED_KEYS, canonical: Canonical | None = None) -> str:
    """A canonical string of the config without the ignored keys: equal strings = same experiment.
    ``canonical`` first maps the config to the keys that define the experiment (see :func:`group_by_seed`)."""
    skip = set(ignore)
    config = canonical(config) if canonical is not None else config
    return json.dumps({k: v for k, v in config.items() if k not in skip}, sort_keys=True, default=str)


def base_name(name: str) -> str:
    """'oats-50-k0.3-s1' -> 'oats-50-k0.3' (a trailing '-s<digits>' seed suffix removed)."""
    return _SEED_SUFFIX.sub("", name)


def group_by_seed(records: Iterable[Mapping[str, Any]], ignore: Iterable[str] = IGNORED_KEYS,
                  canonical: Canonical | None = None) -> list[dict[str, Any]]:
    """Merge records that differ only in the ignored config keys (seed, name) into one row each.

    ``canonical`` maps a record's config to the keys compared (the framework passes
    ``oats.config.experiment_keys``: the keys its config hash covers, so a key added later and left at its
    default, absent from older records, does not split a row); by default every key is compared.

    Row: ``name`` (the members' common name without the '-s<seed>' suffix; the first member's if they
    disagree), ``config`` (the shared config, ignored keys removed), ``names`` and ``seeds`` of the
    successful members, ``n``, ``n_failed``, and ``metrics``: {dotted path: {'mean', 'std', 'n',
    'values'}} over the members that report that metric. Rows come in order of first appearance;
    a group of failed records only is still listed (n = 0, no metrics).
    """
    ignore = tuple(ignore)
    groups: dict[str, dict[str, Any]] = {}
    for rec in records:
        cfg = rec.get("config") or {}
        key = config_key(cfg, ignore, canonical)
        g = groups.setdefault(key, {"config": {k: v for k, v in cfg.items() if k not in set(ignore)}, "members": [], "n_failed": 0,
                                    "first_name": str(rec.get("name", cfg.get("name", "")))})
        if rec.get("status") != "ok":
            g["n_failed"] += 1
            continue
        g["members"].append(rec)
    rows = []
    for g in groups.values():
        members = g["members"]
        names = [str(m.get("name", (m.get("config") or {}).get("name", ""))) for m in members]
        bases = {base_name(n) for n in names}
        name = bases.pop() if len(bases) == 1 else base_name(names[0] if names else g["first_name"])
        per_metric: dict[str, list[float]] = {}
        for m in members:
            for path, v in record_metrics(m).items():
                per_metric.setdefault(path, []).append(v)
        rows.append({
            "name": name,
            "config": g["config"],
            "names": names,
            "seeds": [(m.get("config") or {}).get("seed") for m in members],
            "n": len(members),
            "n_failed": g["n_failed"],
            "metrics": {p: {**summarize(vs), "values": vs} for p, vs in per_metric.items()},
        })
    return rows


def format_rows(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str], digits: int = 2) -> str:
    """A Markdown table: one line per aggregated row, a column per dotted metric path, 'mean ± std (n=k)' cells."""
    head = "| name | " + " | ".join(metrics) + " |"
    sep = "|---|" + "---|" * len(metrics)
    lines = [head, sep]
    for r in rows:
        cells = [mean_std(r["metrics"][m], digits) if m in r["metrics"] else "n/a" for m in metrics]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
