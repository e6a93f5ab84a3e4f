"""Writing matplotlib figures the same way everywhere (tight layout, parent folder made, closed)."""

from __future__ import annotations

import os
from pathlib import Path


def save_figure(fig, path: str | os.PathLike, dpi: int | None = None) -> Path:
    """Lay out, save and close ``fig``; returns the path written."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
