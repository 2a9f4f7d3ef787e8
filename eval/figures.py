"""Writing matplotlib figures: one place for layout, directory creation, resolution and closing."""
from __future__ import annotations

from pathlib import Path


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Tight-layout ``fig``, write it to ``path`` (parents created), close it, return the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
