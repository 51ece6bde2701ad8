"""What ``vpsde parity --report DIR`` writes: ``report.json`` (every figure), ``error_vs_step.png`` (the two
trajectories' relative L2 and the per-call max |a - b| against the step, log scale, one line per compared side)
and, for image bundles, ``samples.png`` (reference row above each test row). Plots need matplotlib
(``pip install vpsde[parity]``); every file is written to a temporary name and renamed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from vpsde.runtime.atomic import atomic_path
from vpsde.runtime.errors import InputError
from vpsde.runtime.images import image_grid, save_png
from vpsde.runtime.parity import ParityReport


def write_report(reports: Sequence[ParityReport], out: Path, value_range: Sequence[float] | None,
                 extra: dict | None = None) -> list[Path]:
    """Write the report files into directory ``out`` (created if missing); returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "report.json"]
    with atomic_path(written[0]) as tmp:
        tmp.write_text(json.dumps({**(extra or {}), "comparisons": [r.to_json() for r in reports]}, indent=1,
                                  allow_nan=True) + "\n")
    written.append(out / "error_vs_step.png")
    plot_errors(reports, written[-1])
    if value_range is not None and reports and reports[0].reference_sample is not None \
            and reports[0].reference_sample.ndim == 4:
        written.append(out / "samples.png")
        rows = [reports[0].reference_sample] + [r.test_sample for r in reports]
        cols = min(8, len(rows[0]))
        save_png(written[-1], image_grid(np.concatenate([r[:cols] for r in rows]), tuple(value_range), cols=cols))
    return written


def plot_errors(reports: Sequence[ParityReport], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("--report plots need matplotlib: pip install 'vpsde[parity]'") from None
    fig, (ax_traj, ax_call) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    floor = 1e-12  # log scale: exact agreement is drawn at the floor
    for r in reports:
        steps = [s.step for s in r.steps]
        ax_traj.semilogy(steps, [max(s.rel_l2, floor) for s in r.steps], label=r.test)
        per_step: dict[int, float] = {}
        for c in r.calls:
            per_step[c.step] = max(per_step.get(c.step, 0.0), *c.max_abs.values())
        ax_call.semilogy(list(per_step), [max(v, floor) for v in per_step.values()], label=r.test)
    if reports:
        ax_call.axhline(reports[0].call_atol, color="gray", linestyle="--", linewidth=0.8, label="per-call atol")
    ax_traj.set(xlabel="step", ylabel="relative L2 of x (free-running)", title=f"trajectory vs {reports[0].reference}"
                if reports else "trajectory")
    ax_call.set(xlabel="step", ylabel="max |a - b| of one call (same inputs)", title="per graph call")
    for ax in (ax_traj, ax_call):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
