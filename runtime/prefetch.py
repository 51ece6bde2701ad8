"""Host noise drawn ahead: on worker threads, so drawing it overlaps the graph calls instead of preceding them
(Philox + Box-Muller in numpy, and the ONNX Runtime / TensorRT call, both release the GIL); or in line, many
calls per pass (:class:`ChunkedNoise`: the per-call cost of numpy is paid once per chunk).

With ``depth`` > 1, that many calls are drawn at once on as many threads: on a GPU the step can be faster than
one core draws its noise (numpy's Philox + Box-Muller makes about 20 M normals/s per core), so the host keeps
several cores on it. A stateful (``ordered``) generator always gets depth 1.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from vpsde.runtime.noise import NoiseSource


class PrefetchedNoise:
    """Noise calls ``first_call .. last_call`` of one batch, in order: :meth:`take` returns call c and, before
    returning, has a worker start on call c + depth. The values are exactly those of ``noise(c, ...)``: the same
    source is called with the same arguments (and, for an ``ordered`` source, one call at a time, in order)."""

    def __init__(self, noise: NoiseSource, first_sample: int, batch: int, sample_shape: tuple[int, ...],
                 first_call: int, last_call: int, depth: int = 1) -> None:
        self._args = (first_sample, batch, tuple(sample_shape))
        self._noise, self._next, self._last = noise, first_call, last_call
        self.depth = 1 if getattr(noise, "ordered", True) else max(1, int(depth))
        self._pool = ThreadPoolExecutor(max_workers=self.depth, thread_name_prefix="vpsde-noise")
        self._pending: deque[Future] = deque()
        for _ in range(self.depth):
            self._submit()

    def _submit(self) -> None:
        if self._next <= self._last:
            self._pending.append(self._pool.submit(self._noise, self._next, *self._args))
            self._next += 1

    def take(self) -> np.ndarray:
        """The next call's noise, float32 [batch, *sample_shape]."""
        if not self._pending:
            raise RuntimeError(f"noise calls exhausted (last call {self._last})")
        current = self._pending.popleft()
        self._submit()
        return current.result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "PrefetchedNoise":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ChunkedNoise:
    """Noise calls ``first_call .. last_call`` of one batch, in order, drawn in line ``chunk`` calls per pass
    (a source with a ``calls`` method, the portable Philox; others one call at a time). :meth:`take` returns
    call c; values are bit-identical to ``noise(c, ...)``. ``chunk`` defaults to as many calls as fit in
    ``budget_bytes`` (at most 64)."""

    def __init__(self, noise: NoiseSource, first_sample: int, batch: int, sample_shape: tuple[int, ...],
                 first_call: int, last_call: int, chunk: int | None = None, budget_bytes: int = 4 << 20) -> None:
        self._args = (first_sample, batch, tuple(sample_shape))
        self._noise, self._next, self._last = noise, first_call, last_call
        per_call = 4 * batch * int(np.prod(sample_shape, dtype=np.int64))
        self.chunk = max(1, int(chunk) if chunk else min(64, budget_bytes // max(1, per_call)))
        if not hasattr(noise, "calls"):
            self.chunk = 1
        self._buffer: np.ndarray | None = None
        self._at = 0

    def take(self) -> np.ndarray:
        """The next call's noise, float32 [batch, *sample_shape]."""
        if self._buffer is None or self._at == len(self._buffer):
            if self._next > self._last:
                raise RuntimeError(f"noise calls exhausted (last call {self._last})")
            k = min(self.chunk, self._last - self._next + 1)
            self._buffer = self._noise.calls(self._next, k, *self._args) if self.chunk > 1 else \
                self._noise(self._next, *self._args)[None]
            self._next += k
            self._at = 0
        self._at += 1
        return self._buffer[self._at - 1]
