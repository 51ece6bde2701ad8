"""Timing of a bundle on one backend: what ``vpsde bench`` prints and the ``bench/`` scripts build on.

Per batch size, in one process: ``iters`` timed loops of ``steps`` steps (after ``warmup`` untimed ones), each
the runtime's own loop (host noise, schedule uploads, NaN guard as configured), and ``iters`` rounds of the
same number of *bare* graph calls (no noise, no uploads, no read-back until the end). Medians are reported; the
loop overhead is loop time / bare time - 1. A likelihood bundle's loop starts from :func:`bench_points` and its
rate counts inputs scored per second; a conditioned bundle's loop gets :func:`bench_conditioning`.

The bare calls must do the loop's own work: on a CPU a call's time depends on its inputs (denormal floats cost
extra: the digits int8 step takes 1.045 ms on the prior sample and 1.095 ms half-way down the trajectory), so
calls replayed on one fixed set of buffers time different arithmetic from the loop's. On a host device the bare
calls are therefore :class:`ReplayedCalls`: the graph calls of one real trajectory (seed 0, the loop's own
inputs), each staged beforehand in buffers of its own and bound once. On a GPU (data-independent kernel times,
and a binding per call would capture a CUDA graph per call) they are :func:`bare_step_seconds`: the program's
graphs launched on buffers bound once.
"""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from vpsde.runtime.loop import DeviceLoop


@dataclass
class BenchRow:
    """One (backend, batch) measurement. Times in ms; ``samples_per_s`` (inputs scored per second for a likelihood
    bundle: :func:`rate_label`) extrapolates ms/step to the bundle's full step count; ``peak_rss_mb`` is the
    process's high-water mark after this row (monotone over rows)."""

    backend: str
    device: str
    batch: int
    cuda_graph: bool
    steps_timed: int
    ms_per_step: float
    bare_ms_per_step: float
    loop_overhead: float
    samples_per_s: float
    first_call_ms: float
    peak_rss_mb: float

    def to_json(self) -> dict:
        return asdict(self)


def bench_points(manifest, batch: int) -> np.ndarray:
    """What a likelihood bundle scores while it is timed: float32 [batch, *sample_shape], uniform in the model's
    value range (images' space) or N(0, 1) where it has none; seeded, the same every run."""
    rng = np.random.default_rng(0)
    shape = (batch, *manifest.model.sample_shape)
    if manifest.model.value_range is None:
        return rng.standard_normal(shape, dtype=np.float32)
    lo, hi = manifest.model.value_range
    return rng.uniform(lo, hi, shape).astype(np.float32)


def bench_conditioning(manifest) -> dict[str, np.ndarray] | None:
    """What a conditioned bundle is timed with, shared by every row: ``known`` one :func:`bench_points` sample and
    (inpainting) ``mask`` keeping the first half of the last axis; None for a bundle that takes none."""
    names = manifest.sampler.conditioning
    if not names:
        return None
    shape = tuple(manifest.model.sample_shape)
    mask = np.zeros(shape, np.float32)
    mask[..., : shape[-1] // 2] = 1.0
    given = {"known": bench_points(manifest, 1)[0], "mask": mask}
    return {name: given[name] for name in names}


def rate_label(manifest) -> str:
    """What the rate column counts: samples per second, or inputs scored per second for a likelihood bundle."""
    return "inputs/s" if manifest.sampler.task == "likelihood" else "samples/s"


def program_run(sampler, batch: int, steps: int) -> Callable[[], Any]:
    """The runtime's own loop over the first ``steps`` steps of ``batch`` rows, seed 0: sampling from the prior
    (given :func:`bench_conditioning` where the bundle takes some), or a likelihood program from
    :func:`bench_points`."""
    if sampler.loop.program.task == "likelihood":
        points = bench_points(sampler.manifest, batch)
        return lambda: sampler.log_likelihood(points, seed=0, stop_after_steps=steps)
    conditioning = bench_conditioning(sampler.manifest)
    return lambda: sampler.sample(batch, seed=0, stop_after_steps=steps, conditioning=conditioning)


def bare_step_seconds(sampler, batch: int, steps: int) -> float:
    """Seconds for ``steps`` rounds of one step's graph calls (in program order) at ``batch`` on the loop's
    buffers at parity 0, bound once, then one read-back, which waits for a GPU to finish."""
    loop = sampler.loop
    ws = loop.workspace(batch)
    parity = {name: 0 for name in ws.rolling}
    launches = [loop.launch_for(ws, call.graph, parity) for call in loop.program.calls]
    for launch in launches:
        launch()
    t0 = time.perf_counter()
    for _ in range(steps):
        for launch in launches:
            launch()
    sampler.device.peek(ws.rolling["x"][1])
    return time.perf_counter() - t0


class _RecordingRunner:
    """Wraps one graph's runner: every launch first keeps host copies of the inputs it is bound to."""

    def __init__(self, key: str, runner, device, graph, calls: list) -> None:
        self.key, self.runner, self.device, self.graph, self.calls = key, runner, device, graph, calls

    def bind(self, buffers: Mapping[str, Any]) -> Callable[[], None]:
        launch = self.runner.bind(buffers)
        inputs = {spec.name: buffers[spec.name] for spec in self.graph.inputs}

        def recording_launch() -> None:
            self.calls.append((self.key, {name: self.device.peek(buf).copy() for name, buf in inputs.items()}))
            launch()

        return recording_launch


class ReplayedCalls:
    """The graph calls of one trajectory of ``sampler`` (:func:`program_run`: ``batch`` rows, the first ``steps``
    steps), recorded once and staged: each call's inputs in buffers of its own, uploaded and bound here (each
    graph's outputs go to one scratch set per graph). :meth:`seconds` launches them all in order: the loop's calls
    on the loop's data with nothing between them. Staging holds every call's inputs at once (about
    ``steps * batch * 2 * sample size * 4`` bytes for EM: 30 MB for 200 steps of 16 x 16 at batch 64)."""

    def __init__(self, sampler, batch: int, steps: int) -> None:
        m, dev = sampler.manifest, sampler.device
        calls: list[tuple[str, dict]] = []
        recorders = {key: _RecordingRunner(key, runner, dev, m.graphs[key], calls)
                     for key, runner in sampler.runners.items()}
        live = sampler.loop
        sampler.loop = DeviceLoop(m, recorders, dev, live.describe_graph)
        try:
            program_run(sampler, batch, steps)()
        finally:
            sampler.loop = live
        scratch = {key: {spec.name: dev.empty(spec.shape_for(batch), spec.dtype) for spec in g.outputs}
                   for key, g in m.graphs.items()}
        self.launches: list[Callable[[], None]] = []
        for key, feed in calls:
            buffers = dict(scratch[key])
            for name, value in feed.items():
                buffers[name] = dev.empty(value.shape, str(value.dtype))
                dev.upload(buffers[name], value)
            self.launches.append(sampler.runners[key].bind(buffers))
        self.device, self.sync = dev, scratch[calls[-1][0]][m.sampler.final]  # the loop's result buffer

    def seconds(self) -> float:
        """Launch every recorded call once, in order, then read back the last call's ``sampler.final`` output
        (which waits for the device; it then holds what the loop returned)."""
        t0 = time.perf_counter()
        for launch in self.launches:
            launch()
        self.device.peek(self.sync)
        return time.perf_counter() - t0


def bare_calls(sampler, batch: int, steps: int) -> Callable[[], float]:
    """The bare-call timer for ``sampler`` at ``batch`` (see the module docstring): a function returning the seconds
    of ``steps`` steps' graph calls: :class:`ReplayedCalls` on a host device, :func:`bare_step_seconds` on a GPU."""
    if sampler.device.on_host:
        return ReplayedCalls(sampler, batch, steps).seconds
    return lambda: bare_step_seconds(sampler, batch, steps)


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM; not ru_maxrss, which Linux carries over fork + exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_sampler(sampler, backend: str, batch: int, steps: int, warmup: int = 1, iters: int = 5,
                  cuda_graph: bool = False) -> BenchRow:
    """Time ``sampler`` (a :class:`~vpsde.runtime.Sampler`, opened with ``cuda_graph``) at one batch size; see the
    module docstring."""
    steps = max(1, min(steps, sampler.manifest.sampler.steps))
    run = program_run(sampler, batch, steps)
    t0 = time.perf_counter()
    bare_step_seconds(sampler, batch, 1)  # the first call of each graph at this batch (allocation, kernels)
    first_call = time.perf_counter() - t0
    for _ in range(warmup):
        run()
    bare_seconds = bare_calls(sampler, batch, steps)
    bare_seconds()  # warm-up (staged buffers, first call per binding)
    loop, bare = [], []
    for _ in range(iters):  # interleaved, so that load drifting over the run hits both alike
        t0 = time.perf_counter()
        run()
        loop.append(time.perf_counter() - t0)
        bare.append(bare_seconds())
    ms, bare_ms = 1e3 * statistics.median(loop) / steps, 1e3 * statistics.median(bare) / steps
    return BenchRow(backend=backend, device=sampler.device.name, batch=batch, cuda_graph=cuda_graph, steps_timed=steps,
                    ms_per_step=ms, bare_ms_per_step=bare_ms, loop_overhead=ms / bare_ms - 1.0,
                    samples_per_s=batch / (ms * 1e-3 * sampler.manifest.sampler.steps),
                    first_call_ms=1e3 * first_call, peak_rss_mb=peak_rss_mb())


def format_table(rows: list[BenchRow], load_s: dict[str, float], rate: str = "samples/s") -> str:
    """The rows as a text table; ``rate`` heads the rate column (:func:`rate_label`)."""
    lines = [f"{'backend':<18}{'device':>20}{'batch':>7}{'graph':>7}{'ms/step':>10}{'bare ms':>10}{'overhead':>10}"
             f"{rate:>11}{'1st call ms':>13}{'peak RSS MB':>13}"]
    for r in rows:
        lines.append(f"{r.backend:<18}{r.device:>20}{r.batch:>7}{'on' if r.cuda_graph else 'off':>7}{r.ms_per_step:>10.3f}"
                     f"{r.bare_ms_per_step:>10.3f}{100 * r.loop_overhead:>9.1f}%{r.samples_per_s:>11.2f}"
                     f"{r.first_call_ms:>13.1f}{r.peak_rss_mb:>13.0f}")
    for backend, seconds in load_s.items():
        lines.append(f"{backend}: bundle load + session/engine open {seconds:.3f} s")
    return "\n".join(lines)


def plot_rows(rows: list[BenchRow], path: Path, title: str, rate: str = "samples/s") -> None:
    """ms/step (loop solid, bare calls dashed) and samples/s against the batch size, one line per backend and
    CUDA-graph mode, log-log; written atomically to ``path`` (PNG)."""
    from vpsde.runtime.plots import pyplot, save

    plt = pyplot("--plot")
    fig, (ax_ms, ax_rate) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    series: dict[str, list[BenchRow]] = {}
    for r in rows:
        series.setdefault(f"{r.backend} ({r.device}{', CUDA graphs' if r.cuda_graph else ''})", []).append(r)
    for k, (label, points) in enumerate(series.items()):
        batch = [r.batch for r in points]
        ax_ms.loglog(batch, [r.ms_per_step for r in points], "o-", color=f"C{k}", label=f"{label}: loop")
        ax_ms.loglog(batch, [r.bare_ms_per_step for r in points], "x--", color=f"C{k}", label=f"{label}: bare calls")
        ax_rate.loglog(batch, [r.samples_per_s for r in points], "o-", color=f"C{k}", label=label)
    ax_ms.set(xlabel="batch", ylabel="ms per step (median)", title=title)
    ax_rate.set(xlabel="batch", ylabel=f"{rate} (whole program)", title="throughput")
    save(fig, (ax_ms, ax_rate), path)
