"""N bare graph calls: the step graph alone, launched on buffers bound once, no noise, no schedule uploads and
no read-back until the end; what a loop's time is compared against to get its overhead."""

from __future__ import annotations

import time


def bare_calls(sampler, batch: int, calls: int) -> float:
    """Seconds for ``calls`` launches of ``sampler``'s first graph (the step graph for single-graph samplers) at
    ``batch``, then one read-back, which waits for a GPU to finish."""
    ws = sampler.loop.workspace(batch)
    key = next(iter(sampler.runners))
    graph = sampler.manifest.graphs[key]
    launch = sampler.runners[key].bind(ws.buffers_for(graph, {name: 0 for name in ws.rolling}))
    launch()
    t0 = time.perf_counter()
    for _ in range(calls):
        launch()
    sampler.device.peek(ws.rolling["x"][1])
    return time.perf_counter() - t0
