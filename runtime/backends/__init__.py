"""Backends: a loader that opens a graph and a runner that owns its buffers and runs it.

A runner has ``activate(batch)`` (allocates every input and output once), ``inputs`` / ``outputs`` (the
preallocated host arrays the sampler fills and reads in place), ``run()`` (one graph call, no allocation),
``infer(feed)`` (checked convenience call for tests and tools) and ``deactivate()``.
"""

from __future__ import annotations

from vpsde.runtime.errors import BackendUnavailable

BACKENDS = ("onnxruntime",)


def make_runner(backend: str, bundle, graph_key: str, device: str = "cpu", threads: int | None = None):
    """Open graph ``graph_key`` of ``bundle`` on ``backend`` (imported only when asked for); ``threads``
    caps intra-op CPU threads (default: the backend's, all cores)."""
    if backend == "onnxruntime":
        from vpsde.runtime.backends.onnxruntime import OnnxRuntimeRunner, session_from_bundle

        return OnnxRuntimeRunner(session_from_bundle(bundle, graph_key, device, threads), bundle, graph_key)
    raise BackendUnavailable(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}")
