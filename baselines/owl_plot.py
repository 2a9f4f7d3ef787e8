"""The OWL figure: each block's sparsity as a bar, next to its layerwise outlier distribution (LOD)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from eval.figures import save_figure


def plot_owl(lod: Sequence[float], sparsity: Sequence[float], target: float, path: str | Path, title: str = "") -> Path:
    """Bar plot of per-block sparsity (bottom) under the per-block LOD (top, in %), target as a line.

    lod: per-block outlier fraction (0..1); sparsity: per-block sparsity (0..1); writes ``path`` (PNG/PDF/SVG).
    """
    if len(lod) != len(sparsity):
        raise ValueError(f"{len(lod)} LOD values but {len(sparsity)} sparsities; need one of each per block")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    if info.get("allocator") != "owl" or "block_sparsity" not in record:
        return None
    return plot_owl(info["lod"], record["block_sparsity"], float(record["config"]["sparsity"]), path, title=str(record.get("name", "")))
