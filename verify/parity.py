"""Trajectory-aware parity: one bundle's program run on two sides (backends, precisions, or the eager torch
steps), with the same host noise, compared per graph call and along the whole trajectory.

A *side* is anything that runs one graph call on host arrays: ``side(key, feed) -> outputs`` (graph key,
``{input name: float32 array}`` -> ``{output name: float32 array}``). Two comparisons run in one pass:

- **per call** (polygraphy's question: does one call agree?): the test side is fed the *reference's* inputs
  (x, state, schedule row, noise, conditioning) and its outputs are compared with the reference's by
  polygraphy's ``SimpleCompareFunc`` (max statistic): max |a - b|, max |a - b| / |b|, and the smallest atol and
  rtol that would have passed; where a side measures the call's gain (``side.gains(key, feed, outputs)``, the
  eager side), or a third, eager ``gain_meter`` does for two backends, the atol bars scale by it
  (:func:`call_bars`); an output that still misses its bar is re-judged by the call's float32 rounding spread
  (:func:`rounding_spread`, where one of those eager sides measures it): it passes if the two sides differ by no
  more than ``SPREAD_MARGIN`` times how far apart the eager call's float32 rounding errors lie on its inputs and
  on copies of them one ulp away. Where a call is ill-conditioned (a mixture's likelihood where its
  responsibilities switch) that spread is wider than any fixed bar; where float32 merely errs the same way
  everywhere (a systematic error both sides share) it is not, and a small model change still fails. Against a
  float64 reference only the float32 side errs: there the eager call's own float32 error on those inputs is
  added to each element's bar (a float32 side is held to what float32 arithmetic of the program reaches);
- **trajectory** (what polygraphy cannot see): each side runs freely from the same prior and noise, carrying its
  own x and state, and after every step the two x's are compared (max abs, relative L2), then the final samples.

Both are :class:`~vpsde.runtime.program.HostTrajectory` drivers of the bundle's compiled program, the one the
device loop walks.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping, Protocol

import numpy as np

from vpsde.runtime.errors import InputError
from vpsde.runtime.loop import infer_once
from vpsde.runtime.manifest import Manifest
from vpsde.runtime.noise import PHILOX_ID, make_noise
from vpsde.runtime.program import HostTrajectory, Program
from vpsde.runtime.request import check_conditioning
from vpsde.runtime.progress import progress as progress_bar
from vpsde.verify.tolerances import SPREAD_MARGIN, SPREAD_RUNS, TOLERANCES, bar_for, resolve_bars


class Side(Protocol):
    name: str

    def __call__(self, key: str, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One call of graph ``key`` on host arrays -> host copies of its outputs."""


class BackendSide:
    """A bundle opened on one backend (the runtime's own runners), one checked call at a time."""

    def __init__(self, bundle, backend: str = "onnxruntime", device: str | None = None,
                 threads: int | None = None, name: str | None = None) -> None:
        from vpsde.runtime.backends import open_backend

        self.manifest: Manifest = bundle.manifest
        opened = open_backend(backend, bundle, device, threads)
        self.device, self.runners = opened.device, opened.runners
        self.name = name or f"{backend}[{self.manifest.model.precision}]"

    def __call__(self, key: str, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return infer_once(self.runners[key], self.device, self.manifest.graphs[key], key, feed)


@dataclass
class CallRecord:
    """One graph call compared with the test side fed the reference's inputs; figures per output name."""

    step: int
    graph: str
    max_abs: dict[str, float]
    max_rel: dict[str, float]
    rel_l2: dict[str, float]
    passed: bool
    failed_outputs: list[str] = field(default_factory=list)
    gain: dict[str, float] = field(default_factory=dict)
    """Per output, max |d output / d eps| where a side measures it (the eager side): its atol was scaled by it."""
    spread: dict[str, float] = field(default_factory=dict)
    """Per output re-judged (it missed its bar): the call's float32 rounding spread (:func:`rounding_spread`)."""
    float32_error: dict[str, float] = field(default_factory=dict)
    """Per output re-judged against a float64 reference: max |eager float32 - float64| of the call on its inputs,
    which each element's bar was widened by (its own element's error)."""

    def atol_scale(self, output: str) -> float:
        """max(1, the output's gain): what its max |a - b| is divided by to compare with a bar."""
        return max(1.0, finite_gain(self.gain, output))

    def spread_atol(self, output: str, atol: float) -> float:
        """A re-judged output's atol: its bar ``atol`` or the spread's margin, the larger."""
        return max(atol, SPREAD_MARGIN * self.spread[output])

    def rejudged_atol(self, output: str) -> float:
        """A re-judged output's widest element bar, its own bar aside: the spread's margin plus, against a float64
        reference, the largest float32 error (what the table's "closest" figure divides by)."""
        return self.spread_atol(output, 0.0) + self.float32_error.get(output, 0.0)


@dataclass
class StepRecord:
    """x of the two free-running trajectories after one step."""

    step: int
    t: float
    max_abs: float
    rel_l2: float


@dataclass
class ParityReport:
    reference: str
    test: str
    num: int
    seed: int
    atol: float
    rtol: float
    call_atol: dict[str, float]
    """Per-call bars by output name ("" for every output not named)."""
    call_rtol: dict[str, float]
    calls: list[CallRecord] = field(default_factory=list)
    steps: list[StepRecord] = field(default_factory=list)
    final_max_abs: float = float("nan")
    final_rel_l2: float = float("nan")
    reference_sample: np.ndarray | None = None
    test_sample: np.ndarray | None = None
    captured: tuple[int, str, dict[str, np.ndarray]] | None = None
    """(step, graph key, feed) of the first failing call, else of the first call: what ``--polygraphy-cmd``
    saves for ``polygraphy run --load-inputs``."""

    @property
    def first_failing_call(self) -> CallRecord | None:
        return next((c for c in self.calls if not c.passed), None)

    @property
    def required_call_atol(self) -> float:
        """The smallest per-call atol, before each call's gain, under which every call passes on max |a - b| alone
        (or 0 for an output that passed its re-judge)."""
        return max((max(self._required_atol(c, k) for k in c.max_abs) for c in self.calls), default=0.0)

    def _required_atol(self, call: CallRecord, output: str) -> float:
        off = call.max_abs[output]
        return 0.0 if output in call.spread and output not in call.failed_outputs else off / call.atol_scale(output)

    @property
    def spread_judged(self) -> list[tuple[CallRecord, str]]:
        """(call, output) of every output re-judged by its rounding spread, in call order."""
        return [(c, k) for c in self.calls for k in c.spread]

    @property
    def required_call_rtol(self) -> float:
        return max((max(c.max_rel.values()) for c in self.calls), default=0.0)

    def required_call_atol_by_output(self) -> dict[str, float]:
        """Per output name: the largest max |a - b| of any call, before its gain (the smallest atol under which it
        passes)."""
        worst: dict[str, float] = {}
        for c in self.calls:
            for k in c.max_abs:
                worst[k] = max(worst.get(k, 0.0), self._required_atol(c, k))
        return worst

    @property
    def final_passed(self) -> bool:
        return bool(self.final_max_abs <= self.atol or self.final_rel_l2 <= self.rtol)

    @property
    def passed(self) -> bool:
        return self.final_passed and self.first_failing_call is None

    def to_json(self) -> dict:
        first = self.first_failing_call
        return {"reference": self.reference, "test": self.test, "num": self.num, "seed": self.seed,
                "passed": self.passed,
                "final": {"max_abs": self.final_max_abs, "rel_l2": self.final_rel_l2, "atol": self.atol,
                          "rtol": self.rtol, "passed": self.final_passed},
                "per_call": {"atol": self.call_atol, "rtol": self.call_rtol, "rule": "polygraphy elemwise, per output "
                             "(\"\": every output not named); where the call's gain G (max |d out / d eps|) is measured "
                             "(eager torch), an output's atol is max(its bar, the \"\" bar x G); an output past it is "
                             "re-judged: it passes within spread_margin x the call's float32 rounding spread (the "
                             "largest difference between the eager call's float32 - float64 errors on its inputs and "
                             "on spread_runs copies moved by one ulp in random directions), plus, against a float64 "
                             "reference, each element's own float32 - float64 error on the call's inputs",
                             "spread_margin": SPREAD_MARGIN, "spread_runs": SPREAD_RUNS,
                             "required_atol": self.required_call_atol, "required_rtol": self.required_call_rtol,
                             "required_atol_by_output": self.required_call_atol_by_output(),
                             "first_failing": None if first is None else asdict(first)},
                "steps": [asdict(s) for s in self.steps], "calls": [asdict(c) for c in self.calls]}


def _rel_l2(ref: np.ndarray, test: np.ndarray) -> float:
    ref, test = ref.astype(np.float64), test.astype(np.float64)
    norm = float(np.linalg.norm(ref))
    diff = float(np.linalg.norm(test - ref))
    return diff / norm if norm > 0 else (0.0 if diff == 0 else float("inf"))


def _max_abs(ref: np.ndarray, test: np.ndarray) -> float:
    d = np.abs(test.astype(np.float64) - ref.astype(np.float64))
    return float("inf") if not np.isfinite(d).all() else float(d.max(initial=0.0))


def compare(manifest: Manifest, reference: Side, test: Side, num: int = 4, seed: int = 0, *,
            atol: float | None = None, rtol: float | None = None,
            call_atol: float | Mapping[str, float] | None = None,
            call_rtol: float | Mapping[str, float] | None = None, precision: str | None = None,
            conditioning: Mapping[str, np.ndarray] | None = None, progress: bool = True,
            on_step: Callable[[StepRecord], None] | None = None, gain_meter=None,
            gains: bool = True) -> ParityReport:
    """Run ``manifest``'s program for ``num`` samples (sample indices 0..num-1, portable noise of ``seed``) on
    both sides; see the module docstring. Tolerances default by ``precision`` (the lower of the two sides';
    default: the manifest's), from :data:`TOLERANCES`; ``call_atol``/``call_rtol`` take a number (every output)
    or a mapping of output name to bar applied over the defaults (see :func:`resolve_bars`). Gains come from
    whichever side has ``gains``, else from ``gain_meter`` (an eager side of the same program), else none;
    ``gains=False``: none (the table's bars alone)."""
    try:
        from polygraphy.comparator.compare import SimpleCompareFunc
        from polygraphy.comparator.struct import IterationResult
        from polygraphy.logger import G_LOGGER
    except ImportError:
        raise InputError("parity compares graph calls with polygraphy: pip install 'vpsde[parity]'") from None

    G_LOGGER.module_severity = G_LOGGER.CRITICAL  # its per-call failure lines: the report has them
    shape = tuple(manifest.model.sample_shape)
    cond = {k: np.broadcast_to(v, (num, *shape)).copy()
            for k, v in check_conditioning(manifest, conditioning, num).items()}  # the request gate's rules
    bars = TOLERANCES[precision or manifest.model.precision]
    report = ParityReport(reference.name, test.name, num, seed, bars.final_atol if atol is None else atol,
                          bars.final_rtol if rtol is None else rtol, resolve_bars(bars.call_atol, call_atol),
                          resolve_bars(bars.call_rtol, call_rtol))
    gain_side = next((side for side in (reference, test) if hasattr(side, "gains")), gain_meter) if gains else None
    spread_side = gain_side if hasattr(gain_side, "rounding_error") else None
    exact_reference = getattr(reference, "arithmetic", None) == "float64"  # only the test side errs as float32 does
    noise = make_noise(PHILOX_ID, seed)  # portable, and the same for both sides whatever the manifest names
    program = Program.compile(manifest)
    x_T = noise(0, 0, num, shape)
    ref, tst = HostTrajectory(program, x_T, cond), HostTrajectory(program, x_T, cond)
    with progress_bar(manifest.sampler.steps, "parity", "step", enabled=progress) as bar:
        for i in program.steps_to_run():
            for call in program.calls:
                drawn = {name: noise(index, 0, num, shape) for name, index in program.draws(call, i)}
                feed = ref.feed(i, call, drawn)
                out_ref = reference(call.graph, feed)
                out_forced = test(call.graph, feed)
                gain = {} if gain_side is None else gain_side.gains(call.graph, feed, _own_outputs(
                    gain_side, reference, test, call.graph, feed, out_ref, out_forced))
                atol = call_bars(report.call_atol, gain, out_ref)
                check = SimpleCompareFunc(atol=atol, rtol=report.call_rtol, check_error_stat="elemwise")
                result = check(IterationResult(out_forced, runner_name=test.name),
                               IterationResult(out_ref, runner_name=reference.name))
                max_abs = {k: _max_abs(out_ref[k], out_forced[k]) for k in out_ref}
                failed = [k for k in out_ref if not (bool(result[k]) and np.isfinite(max_abs[k]))]
                record = CallRecord(i, call.graph, max_abs, {k: _nan_as_inf(v.max_reldiff) for k, v in result.items()},
                                    {k: _rel_l2(out_ref[k], out_forced[k]) for k in out_ref}, not failed, failed, gain)
                if failed and spread_side is not None:
                    rng = np.random.default_rng([seed, len(report.calls)])
                    errors = float32_errors(spread_side, call.graph, feed, rng)
                    _judge_by_spread(record, spread_of(errors), out_ref, out_forced, atol, report.call_rtol,
                                     errors[0] if exact_reference else None)
                report.calls.append(record)
                if report.captured is None or (not record.passed and report.first_failing_call is record):
                    report.captured = (i, call.graph, {k: v.copy() for k, v in feed.items()})
                tst.advance(test(call.graph, tst.feed(i, call, drawn)))
                ref.advance(out_ref)
            step = StepRecord(i, float(program.schedule["t"][i]), _max_abs(ref.values["x"], tst.values["x"]),
                              _rel_l2(ref.values["x"], tst.values["x"]))
            report.steps.append(step)
            if on_step is not None:
                on_step(step)
            bar.update(1)
    report.reference_sample, report.test_sample = ref.result, tst.result
    report.final_max_abs = _max_abs(report.reference_sample, report.test_sample)
    report.final_rel_l2 = _rel_l2(report.reference_sample, report.test_sample)
    return report


def rounding_spread(side, key: str, feed: Mapping[str, np.ndarray], rng: np.random.Generator) -> dict[str, float]:
    """Per output, the call's float32 rounding spread: over ``feed`` and :data:`SPREAD_RUNS` copies of it with every
    element moved by one ulp up or down at random, the largest difference between two of ``side.rounding_error``'s
    float32 - float64 errors (an element's max minus its min; inf where one is not finite). The inputs' own
    sensitivity cancels in each error: the spread is what float32 arithmetic varies by near these inputs."""
    return spread_of(float32_errors(side, key, feed, rng))


def float32_errors(side, key: str, feed: Mapping[str, np.ndarray],
                   rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    """``side.rounding_error`` (per output, float64 [B, ...]) on ``feed``, first, and on :data:`SPREAD_RUNS` copies
    of it with every element moved by one ulp up or down at random."""
    feeds = [feed] + [{name: np.nextafter(v, np.where(rng.random(v.shape) < 0.5, np.inf, -np.inf).astype(v.dtype))
                       for name, v in feed.items()} for _ in range(SPREAD_RUNS)]
    return [side.rounding_error(key, f) for f in feeds]


def spread_of(errors: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """Per output, the largest max - min of an element over ``errors`` (:func:`float32_errors`); inf where one is
    not finite."""
    spread = {}
    for k in errors[0]:
        stacked = np.stack([e[k] for e in errors])
        spread[k] = float(np.ptp(stacked, axis=0).max(initial=0.0)) if np.isfinite(stacked).all() else float("inf")
    return spread


def _judge_by_spread(record: CallRecord, spread: Mapping[str, float], out_ref, out_test,
                     atol: Mapping[str, float], rtol: Mapping[str, float],
                     float32_error: Mapping[str, np.ndarray] | None = None) -> None:
    """Re-judge ``record``'s failed outputs: an element passes within its output's :meth:`CallRecord.spread_atol`
    or rtol of |reference|, plus its own |``float32_error``| where given (a float64 reference: the float32 side is
    expected to carry it); never where the spread or that error is not finite, the shapes differ or the output's
    atol is 0 (a zero bar asks for equality, which nothing widens). ``record`` is updated in place."""
    for k in list(record.failed_outputs):
        record.spread[k] = spread[k]
        carried = 0.0 if float32_error is None else np.abs(float32_error[k])
        if float32_error is not None:
            record.float32_error[k] = float(np.max(carried, initial=0.0))
        bar = bar_for(atol, k)
        excusable = (out_test[k].shape == out_ref[k].shape and bar > 0 and math.isfinite(spread[k])
                     and math.isfinite(record.max_abs[k]) and math.isfinite(record.float32_error.get(k, 0.0)))
        if not excusable:
            continue
        diff = np.abs(out_test[k].astype(np.float64) - out_ref[k])
        if np.all(diff <= np.maximum(record.spread_atol(k, bar), bar_for(rtol, k) * np.abs(out_ref[k])) + carried):
            record.failed_outputs.remove(k)
    record.passed = not record.failed_outputs


def _own_outputs(gain_side, reference, test, key: str, feed, out_ref, out_forced) -> Mapping[str, np.ndarray]:
    """The gain side's unshifted outputs on ``feed``: one of the two already computed, or a run of the meter."""
    if gain_side is reference:
        return out_ref
    return out_forced if gain_side is test else gain_side(key, feed)


def call_bars(bars: Mapping[str, float], gain: Mapping[str, float],
              outputs: Mapping[str, np.ndarray]) -> dict[str, float]:
    """One call's atol per output: the output's bar, or the precision's network-level bar (key "") times the call's
    gain for that output (max |d output / d eps|) where that is larger: a step that multiplies the network's
    rounding by G is held to G times the bar its network is held to."""
    return {"": bars[""], **{k: max(bar_for(bars, k), bars[""] * finite_gain(gain, k)) for k in outputs}}


def finite_gain(gain: Mapping[str, float], output: str) -> float:
    """The output's measured gain; 0 where none was measured or it overflowed (it then widens nothing)."""
    g = gain.get(output, 0.0)
    return g if math.isfinite(g) else 0.0


def _nan_as_inf(v: float | None) -> float:
    return float("inf") if v is None or not np.isfinite(v) else float(v)
