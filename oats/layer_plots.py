"""Per-layer plots of an OATS run: scaled relative reconstruction error and rank, layer by layer."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from eval.figures import save_figure


def plot_layer_error_rank(layers: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Two stacked panels over the layers in pipeline order (x: ``block.layer``): the scaled relative
    error ||(W - W_hat) diag(sqrt D)||_F / ||W diag(sqrt D)||_F, and the rank of the low-rank part
    (0 for methods without one). ``layers`` are the result record's per-layer dicts. Writes ``path`` (PNG/PDF)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["layer"] for r in layers]
    err = [r.get("scaled_rel_error") or 0.0 for r in layers]
    rank = [r.get("rank", 0) or 0 for r in layers]
    kinds = sorted({n.split(".", 1)[1] for n in names})
    colors = {k: plt.cm.tab10(i % 10) for i, k in enumerate(kinds)}
    c = [colors[n.split(".", 1)[1]] for n in names]
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(max(8, len(names) * 0.06), 6), sharex=True)
    x = range(len(names))
    a1.bar(x, err, color=c, width=1.0)
    a1.set_ylabel("scaled rel. error")
    a2.bar(x, rank, color=c, width=1.0)
    a2.set_ylabel("rank")
    blocks = [r["block"] for r in layers]
    ticks = [i for i in x if i == 0 or blocks[i] != blocks[i - 1]]
    a2.set_xticks(ticks, [str(blocks[i]) for i in ticks], fontsize=7)
    a2.set_xlabel("block")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[k]) for k in kinds]
    a1.legend(handles, kinds, fontsize=7, ncol=min(len(kinds), 4))
    if title:
        a1.set_title(title)
    return save_figure(fig, path)
