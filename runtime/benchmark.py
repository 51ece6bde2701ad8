"""Timing of a bundle on one backend: what ``vpsde bench`` prints and the ``bench/`` scripts build on.

Per batch size, in one process: ``iters`` timed loops of ``steps`` steps (after ``warmup`` untimed ones), each
the runtime's own loop (host noise, schedule uploads, NaN guard as configured), and ``iters`` rounds of the
same number of *bare* graph calls (the program's graphs launched on buffers bound once: no noise, no uploads,
no read-back until the end). Medians are reported; the loop overhead is loop time / bare time - 1.
"""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class BenchRow:
    """One (backend, batch) measurement. Times in ms; ``samples_per_s`` extrapolates ms/step to the bundle's
    full step count; ``peak_rss_mb`` is the process's high-water mark after this row (monotone over rows)."""

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


def bare_step_seconds(sampler, batch: int, steps: int) -> float:
    """Seconds for ``steps`` rounds of the program's graph calls (each graph ``repeat`` times, in program
    order) at ``batch`` on buffers bound once, then one read-back, which waits for a GPU to finish."""
    ws = sampler.loop.workspace(batch)
    parity = {name: 0 for name in ws.rolling}
    m = sampler.manifest
    launches = [(sampler.runners[pc.graph].bind(ws.buffers_for(m.graphs[pc.graph], parity)), pc.repeat)
                for pc in m.sampler.program]
    for launch, _ in launches:
        launch()
    t0 = time.perf_counter()
    for _ in range(steps):
        for launch, repeat in launches:
            for _ in range(repeat):
                launch()
    sampler.device.peek(ws.rolling["x"][1])
    return time.perf_counter() - t0


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
    run = lambda: sampler.sample(batch, seed=0, stop_after_steps=steps)  # noqa: E731
    t0 = time.perf_counter()
    bare_step_seconds(sampler, batch, 1)  # the first call of each graph at this batch (allocation, kernels)
    first_call = time.perf_counter() - t0
    for _ in range(warmup):
        run()
    loop, bare = [], []
    for _ in range(iters):  # interleaved, so that load drifting over the run hits both alike
        t0 = time.perf_counter()
        run()
        loop.append(time.perf_counter() - t0)
        bare.append(bare_step_seconds(sampler, batch, steps))
    ms, bare_ms = 1e3 * statistics.median(loop) / steps, 1e3 * statistics.median(bare) / steps
    return BenchRow(backend=backend, device=sampler.device.name, batch=batch, cuda_graph=cuda_graph, steps_timed=steps,
                    ms_per_step=ms, bare_ms_per_step=bare_ms, loop_overhead=ms / bare_ms - 1.0,
                    samples_per_s=batch / (ms * 1e-3 * sampler.manifest.sampler.steps),
                    first_call_ms=1e3 * first_call, peak_rss_mb=peak_rss_mb())


def format_table(rows: list[BenchRow], load_s: dict[str, float]) -> str:
    lines = [f"{'backend':<18}{'device':>20}{'batch':>7}{'graph':>7}{'ms/step':>10}{'bare ms':>10}{'overhead':>10}"
             f"{'samples/s':>11}{'1st call ms':>13}{'peak RSS MB':>13}"]
    for r in rows:
        lines.append(f"{r.backend:<18}{r.device:>20}{r.batch:>7}{'on' if r.cuda_graph else 'off':>7}{r.ms_per_step:>10.3f}"
                     f"{r.bare_ms_per_step:>10.3f}{100 * r.loop_overhead:>9.1f}%{r.samples_per_s:>11.2f}"
                     f"{r.first_call_ms:>13.1f}{r.peak_rss_mb:>13.0f}")
    for backend, seconds in load_s.items():
        lines.append(f"{backend}: bundle load + session/engine open {seconds:.3f} s")
    return "\n".join(lines)
