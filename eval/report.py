"""Result records -> the papers' tables (Markdown, CSV, LaTeX) and plots (PNG).

    python main.py --report --out results/      # writes results/report/{results.md,results.csv,results.tex,*.png}

Table layout (Wanda/SparseGPT/OATS): one row per model x method x compression, columns = token
perplexity per (data set, eval_seqlen), lm_eval word perplexity, each zero-shot task (the papers'
metric, in percent), their unweighted mean, MMLU. Approximate data (the HellaSwag stand-in) and
example limits are named in the ``notes`` column, never silently mixed in.
Plots: perplexity vs. compression (one line per method and model), per-task accuracy (grouped bars),
and per-layer sparsity / rank (one figure per compressed experiment).
"""
from __future__ import annotations

import csv
import io
import math
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

from data.files import atomic_write_text
from eval.aggregate import Canonical
from eval.figures import save_figure
from eval.zero_shot import APPROX_SUFFIX, PAPER_TASKS

Row = dict[str, Any]


def method_label(cfg: dict[str, Any], base: str | None = None) -> str:
    """How tables name an experiment: 'wanda', 'OWL + wanda', 'sparsegpt + OPTIMA', 'OATS (κ=0.3, 80 it,
    fast) + RECONSTRUCT'... ``base`` is the method's own label (the framework passes it); without it
    (records that carry no ``method_label``) the method's name."""
    method = base or cfg.get("method", "?")
    if cfg.get("layerwise", "uniform") != "uniform":
        method = f"{cfg['layerwise'].upper()} + {method}"
    for key in ("weight_update", "update", "block_update", "model_update"):
        if cfg.get(key, "none") not in ("none", None):
            method = f"{method} + {cfg[key].upper()}"
    return method


def record_label(r: dict[str, Any]) -> str:
    """How tables name a record's method: the label the framework recorded, else one from its config."""
    return r.get("method_label") or method_label(r.get("config", {}))


def compresses(r: dict[str, Any]) -> bool:
    """Whether the record is of a compressing method (older records: all but 'dense')."""
    return bool(r.get("compresses", r.get("config", {}).get("method") != "dense"))


def compression_label(r: dict[str, Any]) -> str:
    """'0' for the reference row, else the sparsity (for OATS the compression rate), with N:M when structured."""
    cfg = r.get("config", {})
    if not compresses(r):
        return "0"
    s = f"{cfg.get('sparsity', float('nan')):g}"
    return s if cfg.get("sparsity_type", "unstructured") == "unstructured" else f"{s} ({cfg['sparsity_type']})"


def _task_order(name: str) -> tuple[int, str]:
    base = name[: -len(APPROX_SUFFIX)] if name.endswith(APPROX_SUFFIX) else name
    return (PAPER_TASKS.index(base) if base in PAPER_TASKS else len(PAPER_TASKS), name)


def _ok(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r.get("status", "ok") == "ok" and r.get("metrics") is not None]


def _sort_key(r: dict[str, Any]) -> tuple:
    c = r.get("config", {})
    dense = not compresses(r)
    return (str(c.get("model")), not dense, record_label(r), c.get("sparsity_type", "unstructured") != "unstructured", c.get("sparsity_type", ""), 0.0 if dense else c.get("sparsity", 0.0), c.get("name", ""))


def build_table(records: Iterable[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Header and rows (raw values: floats, None for missing) of the paper-style table.

    Perplexities are as recorded; accuracies are converted to percent."""
    recs = sorted(_ok(records), key=_sort_key)
    ppl_cols = sorted({(d, r["config"].get("eval_seqlen")) for r in recs for d in (r["metrics"].get("ppl") or {})}, key=str)
    wppl_cols = sorted({(d, (v or {}).get("max_length")) for r in recs for d, v in (r["metrics"].get("word_ppl") or {}).items()}, key=str)
    tasks = sorted({t for r in recs for t in (r["metrics"].get("zero_shot") or {}) if t not in ("mean", "mmlu")}, key=_task_order)
    has_mean = any("mean" in (r["metrics"].get("zero_shot") or {}) for r in recs)
    has_mmlu = any("mmlu" in (r["metrics"].get("zero_shot") or {}) for r in recs)
    header = ["model", "method", "compression"]
    header += [f"{d} ppl @{s}" for d, s in ppl_cols]
    header += [f"{d} word ppl @{s} (lm_eval)" for d, s in wppl_cols]
    header += [t.replace(APPROX_SUFFIX, " (approx)") for t in tasks]
    header += ["mean"] if has_mean else []
    header += ["mmlu"] if has_mmlu else []
    header += ["notes"]
    rows = []
    for r in recs:
        c, m = r["config"], r["metrics"]
        zs = m.get("zero_shot") or {}
        row: list[Any] = [str(c.get("model")).rstrip("/").split("/")[-1], record_label(r), compression_label(r)]
        row += [(m.get("ppl") or {}).get(d) if c.get("eval_seqlen") == s else None for d, s in ppl_cols]
        row += [((m.get("word_ppl") or {}).get(d) or {}).get("word_perplexity") if ((m.get("word_ppl") or {}).get(d) or {}).get("max_length") == s else None for d, s in wppl_cols]
        row += [_pct(zs.get(t)) for t in tasks]
        row += [_pct(zs.get("mean"))] if has_mean else []
        row += [_pct(zs.get("mmlu"))] if has_mmlu else []
        row.append(_notes(r))
        rows.append(row)
    return header, rows


def _pct(v: Any) -> float | None:
    return None if v is None else 100.0 * float(v)


def _notes(r: dict[str, Any]) -> str:
    m = r["metrics"]
    info = m.get("zero_shot_info") or {}
    notes = []
    if info.get("limit"):
        notes.append(f"zero-shot limit {info['limit']}")
    if info.get("approximate"):
        notes.append("approx. data: " + ", ".join(info["approximate"]))
    if info.get("fewshot"):
        notes.append(f"{info['fewshot']}-shot")
    mmlu = m.get("mmlu")
    if mmlu:
        notes.append(f"mmlu {mmlu.get('fewshot')}-shot, {len(mmlu.get('subjects', {}))} subjects")
    return "; ".join(notes)


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def to_markdown(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i < 3 or h == "notes" else "---:" for i, h in enumerate(header)) + "|"]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def to_csv(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Full precision numbers (repr), empty cells for missing values."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for row in rows:
        w.writerow(["" if v is None else (repr(v) if isinstance(v, float) else v) for v in row])
    return buf.getvalue()


_LATEX_ESC = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}", "\\": r"\textbackslash{}"}


def latex_escape(s: str) -> str:
    return re.sub(r"[&%$#_{}~^\\]", lambda m: _LATEX_ESC[m.group()], s)


def to_latex(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A booktabs ``tabular`` (needs ``\\usepackage{booktabs}``); '--' for missing values."""
    spec = "lll" + "r" * (len(header) - 4) + "l"
    out = [r"\begin{tabular}{" + spec + "}", r"\toprule", " & ".join(latex_escape(h) for h in header) + r" \\", r"\midrule"]
    for row in rows:
        out.append(" & ".join("--" if _fmt(v) == "–" else latex_escape(_fmt(v)) for v in row) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_ppl_vs_compression(records: Iterable[dict[str, Any]], path: Path) -> Path | None:
    """Token perplexity against compression, one line per (model, method, pattern, data set @ seqlen);
    records that differ only in their calibration seed are one point, the mean, with the sample std as
    an error bar. The model's dense run, when present, is each line's point at 0 and a dotted line,
    labelled at the right edge so the label never sits on a curve. Log y axis. None if nothing to plot."""
    from eval.aggregate import summarize

    recs = _ok(records)
    points: dict[str, dict[float, list[float]]] = {}
    dense: dict[tuple[str, str], float] = {}
    for r in recs:
        c = r["config"]
        for d, v in (r["metrics"].get("ppl") or {}).items():
            key_ds = f"{d}@{c.get('eval_seqlen')}"
            model = str(c.get("model")).rstrip("/").split("/")[-1]
            if not compresses(r):
                dense[(model, key_ds)] = v
                continue
            pattern = "" if c.get("sparsity_type", "unstructured") == "unstructured" else f" {c['sparsity_type']}"
            points.setdefault(f"{model} | {record_label(r)}{pattern} | {key_ds}", {}).setdefault(float(c["sparsity"]), []).append(float(v))
    if not points and not dense:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, by_x in sorted(points.items()):
        model, _, key_ds = (p.strip() for p in label.split("|"))
        xs = sorted(by_x)
        stats = [summarize(by_x[x]) for x in xs]
        ys, errs = [st["mean"] for st in stats], [st["std"] or 0.0 for st in stats]
        if (model, key_ds) in dense:
            xs, ys, errs = [0.0, *xs], [dense[(model, key_ds)], *ys], [0.0, *errs]
        ax.errorbar(xs, ys, yerr=errs if any(errs) else None, marker="o", capsize=3,
                    label=label + (" (mean ± std over seeds)" if any(errs) else ""))
    for (model, key_ds), v in sorted(dense.items()):
        ax.axhline(v, color="gray", ls=":", lw=1)
        ax.annotate(f"dense {model} {key_ds}", (1.0, v), xycoords=("axes fraction", "data"), xytext=(-4, 4),
                    textcoords="offset points", ha="right", va="bottom", fontsize=7, color="gray")
    ax.set_yscale("log")
    ax.set_xlabel("compression (fraction of parameters removed)")
    ax.set_ylabel("token perplexity")
    ax.grid(alpha=0.3)
    if points:
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def seed_table(records: Iterable[dict[str, Any]], canonical: Canonical | None = None) -> str | None:
    """Markdown table of the experiments run over several calibration seeds: mean ± std (n) of every
    perplexity, the zero-shot mean and the achieved sparsity; None when no experiment has two seeds.
    ``canonical``: as in :func:`eval.aggregate.group_by_seed`."""
    from eval.aggregate import format_rows, group_by_seed

    groups = group_by_seed(_ok(records), canonical=canonical)
    if not any(g["n"] > 1 for g in groups):
        return None
    metrics = sorted({k for g in groups for k in g["metrics"] if k.startswith("ppl.") or k in ("zero_shot.mean", "achieved_sparsity")})
    return format_rows(groups, metrics) + "\n"


def plot_task_accuracy(records: Iterable[dict[str, Any]], path: Path) -> Path | None:
    """Grouped bars: one group per zero-shot task (and the mean), one bar per experiment, in percent."""
    recs = sorted([r for r in _ok(records) if r["metrics"].get("zero_shot")], key=_sort_key)
    if not recs:
        return None
    tasks = sorted({t for r in recs for t in r["metrics"]["zero_shot"] if t not in ("mean",)}, key=_task_order)
    if any("mean" in r["metrics"]["zero_shot"] for r in recs):
        tasks.append("mean")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(tasks) * max(1, len(recs)) / 2), 4.5))
    width = 0.8 / len(recs)
    for i, r in enumerate(recs):
        c = r["config"]
        vals = [100 * r["metrics"]["zero_shot"].get(t, float("nan")) for t in tasks]
        ax.bar([j + i * width for j in range(len(tasks))], vals, width, label=f"{c.get('name')} ({record_label(r)} {compression_label(r)})")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], [t.replace(APPROX_SUFFIX, "\n(approx)") for t in tasks], fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_layers(record: dict[str, Any], path: Path) -> Path | None:
    """Per-layer sparsity (and OATS rank, and scaled relative error when recorded) in pipeline order."""
    layers = record.get("layers") or []
    if not layers:
        return None
    plt = _plt()
    has_rank = any(l.get("rank") is not None for l in layers)
    has_err = any(l.get("scaled_rel_error") is not None for l in layers)
    n = 1 + has_rank + has_err
    fig, axes = plt.subplots(n, 1, figsize=(max(7, len(layers) * 0.06), 2.4 * n), sharex=True, squeeze=False)
    x = list(range(len(layers)))
    axes[0][0].plot(x, [l.get("sparsity") for l in layers], ".-", lw=0.8)
    axes[0][0].set_ylabel("sparsity")
    k = 1
    if has_rank:
        axes[k][0].plot(x, [l.get("rank") for l in layers], ".-", lw=0.8, color="C1")
        axes[k][0].set_ylabel("rank")
        k += 1
    if has_err:
        axes[k][0].plot(x, [l.get("scaled_rel_error") for l in layers], ".-", lw=0.8, color="C2")
        axes[k][0].set_ylabel("scaled rel. error")
    blocks = [l.get("block") for l in layers]
    starts = [i for i in x if i == 0 or blocks[i] != blocks[i - 1]]
    for ax in axes[:, 0]:
        for s in starts:
            ax.axvline(s, color="gray", lw=0.3)
        ax.grid(alpha=0.3)
    axes[-1][0].set_xlabel("linear layer (pipeline order; grey lines start a block)")
    c = record.get("config", {})
    axes[0][0].set_title(f"{c.get('name')}: {record_label(record)} {compression_label(record)}", fontsize=9)
    return save_figure(fig, path)


def plot_owl(lod: Sequence[float], sparsity: Sequence[float], target: float, path: str | Path, title: str = "") -> Path:
    """The OWL figure: per-block sparsity (bottom) under the per-block LOD (top, in %), target as a line.

    lod: per-block outlier fraction (0..1); sparsity: per-block sparsity (0..1); writes ``path`` (PNG/PDF/SVG).
    """
    if len(lod) != len(sparsity):
        raise ValueError(f"{len(lod)} LOD values but {len(sparsity)} sparsities; need one of each per block")
    plt = _plt()
    blocks = list(range(len(lod)))
    fig, (ax_lod, ax_sp) = plt.subplots(2, 1, figsize=(max(6.0, 0.25 * len(blocks) + 2), 5), sharex=True)
    ax_lod.bar(blocks, [100 * v for v in lod], color="tab:orange")
    ax_lod.set_ylabel("LOD (% outliers)")
    ax_sp.bar(blocks, [100 * s for s in sparsity], color="tab:blue")
    ax_sp.axhline(100 * target, color="k", linestyle="--", linewidth=1, label=f"target {100 * target:g}%")
    lo, hi = min(sparsity), max(sparsity)
    pad = max(0.02, 0.2 * (hi - lo))
    ax_sp.set_ylim(100 * max(0.0, lo - pad), 100 * min(1.0, hi + pad))
    ax_sp.set_ylabel("sparsity (%)")
    ax_sp.set_xlabel("block")
    ax_sp.legend(loc="upper right", fontsize=8)
    if title:
        ax_lod.set_title(title)
    return save_figure(fig, path)


def plot_owl_record(record: dict[str, Any], path: str | Path) -> Path | None:
    """The OWL figure of one result record (``record['layerwise']``, ``record['block_sparsity']``);
    None when the record has no OWL allocation."""
    info = record.get("layerwise") or {}
    name = info.get("name", info.get("allocator"))  # records written by older versions name it under 'allocator'
    if name != "owl" or "block_sparsity" not in record:
        return None
    return plot_owl(info["lod"], record["block_sparsity"], float(record["config"]["sparsity"]), path, title=str(record.get("name", "")))


def summary_markdown(records: Iterable[dict[str, Any]]) -> str:
    """One row per experiment, failed ones too: method, compression, status, achieved sparsity,
    perplexities, zero-shot, calibration and evaluation tokens, times."""
    records = list(records)
    ppl_cols = sorted({k for r in records for k in ((r.get("metrics") or {}).get("ppl") or {})})
    extra = sorted({k for r in records for k in ((r.get("metrics") or {}).get("zero_shot") or {})}, key=_task_order)
    head = ["experiment", "model", "method", "compression", "status", "achieved"]
    vision = [c for c in _VISION_COLS if any(_vision_value(r, c) is not None for r in records)]
    head += [f"ppl {c} (seqlen)" for c in ppl_cols] + extra + [c[0] for c in vision] + ["cal tokens", "eval tokens", "compress s", "total s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        c = r.get("config", {})
        m = r.get("metrics") or {}
        t = r.get("timings") or {}
        row = [str(c.get("name", r.get("name", "?"))), str(c.get("model", "?")).rstrip("/").split("/")[-1], record_label(r),
               compression_label(r), str(r.get("status", "?")), _fmt4(r.get("achieved_sparsity"))]
        ppl = m.get("ppl") or {}
        row += [f"{_fmt(ppl[col])} ({c.get('eval_seqlen')})" if col in ppl else "–" for col in ppl_cols]
        row += [_fmt(_pct((m.get("zero_shot") or {}).get(k))) for k in extra]
        row += [_fmt4(_vision_value(r, col)) for col in vision]
        cal = f"{c.get('cal_nsamples')} × {c.get('cal_seqlen')}" if compresses(r) else "–"
        if compresses(r) and "image_size" in c:  # a vision experiment: images, not token windows
            cal = f"{c.get('cal_nsamples')} images ({c.get('cal_dataset')}) @{c.get('image_size')}px"
        ev = r.get("eval_tokens") or {}
        row += [cal, ", ".join(f"{v}" for v in ev.values()) or "–", _fmt(t.get("compression")), _fmt(t.get("total"))]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


_VISION_COLS = (("CLS cos", "fidelity", "cls_cos"), ("patch cos", "fidelity", "patch_cos"), ("probe top-1", "probe", "top1"),
                ("top-1", "topk", "top1"), ("top-5", "topk", "top5"))


def _vision_value(record: dict[str, Any], col: tuple[str, str, str]) -> Any:
    return (((record.get("metrics") or {}).get("vision") or {}).get(col[1]) or {}).get(col[2])


def _fmt4(v: Any) -> str:
    return "–" if v is None else f"{float(v):.4f}"


def write_report(records: Sequence[dict[str, Any]], out_dir: Path, canonical: Canonical | None = None) -> dict[str, Path]:
    """Write results.{md,csv,tex} and the PNG plots under ``out_dir``; returns {kind: path}. ``canonical``
    decides which records are seeds of one experiment (:func:`eval.aggregate.group_by_seed`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    header, rows = build_table(records)
    written: dict[str, Path] = {}
    for kind, text in (("md", to_markdown(header, rows)), ("csv", to_csv(header, rows)), ("tex", to_latex(header, rows))):
        p = out_dir / f"results.{kind}"
        atomic_write_text(p, text)
        written[kind] = p
    if (text := seed_table(records, canonical)) is not None:
        atomic_write_text(out_dir / "results_by_seed.md", text)
        written["seeds"] = out_dir / "results_by_seed.md"
    if (p := plot_ppl_vs_compression(records, out_dir / "ppl_vs_compression.png")) is not None:
        written["ppl_plot"] = p
    if (p := plot_task_accuracy(records, out_dir / "zero_shot_accuracy.png")) is not None:
        written["accuracy_plot"] = p
    for r in _ok(records):
        name = r.get("config", {}).get("name") or r.get("name")
        if (p := plot_layers(r, out_dir / f"layers_{name}.png")) is not None:
            written[f"layers_{name}"] = p
        if (p := plot_owl_record(r, out_dir / f"owl_{name}.png")) is not None:
            written[f"owl_{name}"] = p
    return written
