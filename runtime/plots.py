"""What the report plots share: matplotlib's headless pyplot, and a figure finished (grids, legends) and written
atomically as PNG. Plots need matplotlib (``pip install vpsde[parity]``)."""

from __future__ import annotations

from pathlib import Path

from vpsde.runtime.atomic import atomic_path
from vpsde.runtime.errors import InputError


def pyplot(flag: str):
    """matplotlib.pyplot on the Agg backend; ``flag`` names the option that needs it in the error."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError(f"{flag} needs matplotlib: pip install 'vpsde[parity]'") from None
    return plt


def save(fig, axes, path: Path) -> None:
    """Grid and legend on each of ``axes``, then ``fig`` written to ``path`` (PNG, atomically) and closed."""
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    pyplot("plots").close(fig)
