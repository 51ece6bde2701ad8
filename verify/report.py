"""What ``vpsde parity --report DIR`` writes: ``report.json`` (every figure), ``error_vs_step.png`` (the two
trajectories' relative L2 and the per-call max |a - b| against the step, log scale, one line per compared side)
and, for image bundles, ``samples.png`` (reference row above each test row). Plots need matplotlib
(``pip install vpsde[parity]``); every file is written to a temporary name and renamed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence


from vpsde.runtime.atomic import atomic_path
from vpsde.runtime.images import image_grid
from vpsde.verify.parity import ParityReport
from vpsde.verify.tolerances import bar_for
from vpsde.runtime.plots import pyplot, save


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
        plot_samples(reports, tuple(value_range), written[-1])
    return written


def plot_samples(reports: Sequence[ParityReport], value_range: tuple[float, float], path: Path) -> None:
    """The reference's first samples (up to 8) in one labelled row, each test side's in a row below."""
    plt = pyplot("--report")
    rows = [(f"reference: {reports[0].reference}", reports[0].reference_sample)] + \
           [(f"test: {r.test}", r.test_sample) for r in reports]
    cols = min(8, len(rows[0][1]))
    fig, axes = plt.subplots(len(rows), 1, figsize=(1.1 * cols + 0.5, 1.4 * len(rows) + 0.2), squeeze=False,
                             constrained_layout=True)
    for ax, (label, sample) in zip(axes[:, 0], rows):
        grid = image_grid(sample[:cols], value_range, cols=cols)
        ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=255,
                  interpolation="nearest")
        ax.set_title(label[:80], fontsize=8, loc="left")
        ax.set_xticks([])
        ax.set_yticks([])
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def plot_errors(reports: Sequence[ParityReport], path: Path) -> None:
    plt = pyplot("--report")
    fig, (ax_traj, ax_call) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    floor = 1e-12  # log scale: exact agreement is drawn at the floor
    outputs = sorted({name for r in reports for c in r.calls for name in c.max_abs})
    color = {name: f"C{k}" for k, name in enumerate(outputs)}  # one color per output; one line style per side
    for side, r in enumerate(reports):
        style = ["-", "--", "-.", ":"][side % 4]
        steps = [s.step for s in r.steps]
        ax_traj.semilogy(steps, [max(s.rel_l2, floor) for s in r.steps], linestyle=style, label=r.test)
        per_output: dict[str, dict[int, float]] = {}
        for c in r.calls:
            for name, v in c.max_abs.items():
                per_step = per_output.setdefault(name, {})
                per_step[c.step] = max(per_step.get(c.step, 0.0), v)
        for name, per_step in per_output.items():
            ax_call.semilogy(list(per_step), [max(v, floor) for v in per_step.values()], color=color[name],
                             linestyle=style, label=f"{r.test}: {name}")
    if reports:
        r = reports[0]
        ax_traj.axhline(r.rtol, color="gray", linestyle="--", linewidth=0.8, label=f"final rtol {r.rtol:g}")
        for name in outputs:
            bar = bar_for(r.call_atol, name)
            ax_call.axhline(bar, color=color[name], linestyle=":", linewidth=1.0, label=f"atol {name} {bar:g}")
    ax_traj.set(xlabel="step", ylabel="relative L2 of x (free-running)", title=f"trajectory vs {reports[0].reference}"
                if reports else "trajectory")
    ax_call.set(xlabel="step", ylabel="max |a - b| of one call (same inputs)", title="per graph call")
    save(fig, (ax_traj, ax_call), path)
