"""The bars parity and the OpenVINO open check hold each precision to: one table, from which ``vpsde parity
--help`` is generated. docs/parity.md gives the measurements behind each figure."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from vpsde.runtime.manifest import PRECISIONS


@dataclass(frozen=True)
class Tolerance:
    """The bars of one precision (the lower of the two compared sides'). Per graph call, polygraphy's elementwise
    rule by output name (an element passes within its output's atol or rtol; key "" is every output not named);
    on the final sample, max |a - b| <= ``final_atol`` or relative L2 <= ``final_rtol``; ``open_check``: the
    OpenVINO backend's open-time bar, max |OpenVINO - ONNX Runtime| / max(1, |output|)."""

    call_atol: Mapping[str, float]
    call_rtol: Mapping[str, float]
    final_atol: float
    final_rtol: float
    open_check: float


TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance({"": 1e-5, "x0": 1.5e-3}, {"": 1e-5}, 1e-4, 1e-3, 1e-4),
    "fp16": Tolerance({"": 4e-3, "x0": 0.6}, {"": 1e-2}, 1e-2, 1e-2, 1e-2),
    "bf16": Tolerance({"": 5e-2, "x0": 7.5}, {"": 5e-2}, 5e-2, 5e-2, 5e-2),
    "int8": Tolerance({"": 5e-2, "x0": 7.5}, {"": 5e-2}, 0.15, 3e-2, 5e-2),
}
"""Bars by precision (every one of the manifest's ``PRECISIONS``, in its order). ``x0`` (DPM-Solver++'s data
prediction, carried as state) is (x - sigma eps) / alpha: it scales every rounding of x and eps by 1 / alpha(t),
up to 150 at t = 1 on the default VP-SDE, so its per-call atol is the precision's times 150."""


SPREAD_RUNS = 8
"""An output past its bar is re-judged by the call's float32 rounding spread: how far apart the eager call's
float32 - float64 errors lie on its inputs and on this many copies of them each moved by one ulp in random
directions (Monte Carlo arithmetic's way of asking how much float32 arithmetic varies near these inputs)."""

SPREAD_MARGIN = 8.0
"""A re-judged output passes where the two sides differ by at most this many times the spread (a maximum over
few runs and few elements, so a noisy one: docs/parity.md, "Ill-conditioned calls", has the measurements)."""


def tolerance_help() -> str:
    """The default bars as the CLI's help prints them (one line per precision)."""
    def per_output(bars: Mapping[str, float]) -> str:
        return " ".join(f"{k + ':' if k else ''}{v:g}" for k, v in sorted(bars.items(), key=lambda kv: kv[0] != ""))
    return "\n".join(f"  {p:<5} call atol {per_output(t.call_atol):<18} call rtol {per_output(t.call_rtol):<8} "
                     f"final atol {t.final_atol:<6g} final rtol {t.final_rtol:g}" for p, t in TOLERANCES.items())


def resolve_bars(default: Mapping[str, float], given: float | Mapping[str, float] | None) -> dict[str, float]:
    """Per-output bars: ``default`` with ``given`` applied. A number replaces every output's bar; a mapping
    (output name -> bar, "" for every output not named) replaces the outputs it names."""
    if given is None:
        return dict(default)
    return {**default, **given} if isinstance(given, Mapping) else {"": float(given)}


def bar_for(bars: Mapping[str, float], output: str) -> float:
    return bars.get(output, bars[""])


def lower_precision(*precisions: str) -> str:
    """The least precise of ``precisions`` (in the order of :data:`PRECISIONS`)."""
    return max(precisions, key=PRECISIONS.index)


