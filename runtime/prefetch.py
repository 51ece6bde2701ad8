"""Host noise drawn one call ahead on a worker thread, so drawing it overlaps the graph call instead of
preceding it (Philox + Box-Muller in numpy, and the ONNX Runtime / TensorRT call, both release the GIL)."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from vpsde.runtime.noise import NoiseSource


class PrefetchedNoise:
    """Noise calls ``first_call .. last_call`` of one batch, in order: :meth:`take` returns call c and, before
    returning, has the worker start on call c + 1. The values are exactly those of ``noise(c, ...)``: the same
    source is called with the same arguments, one call at a time, in order (so the order-dependent "torch"
    generator works too)."""

    def __init__(self, noise: NoiseSource, first_sample: int, batch: int, sample_shape: tuple[int, ...],
                 first_call: int, last_call: int) -> None:
        self._args = (first_sample, batch, tuple(sample_shape))
        self._noise, self._next, self._last = noise, first_call, last_call
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vpsde-noise")
        self._pending: Future | None = self._submit()

    def _submit(self) -> Future | None:
        if self._next > self._last:
            return None
        future = self._pool.submit(self._noise, self._next, *self._args)
        self._next += 1
        return future

    def take(self) -> np.ndarray:
        """The next call's noise, float32 [batch, *sample_shape]."""
        if self._pending is None:
            raise RuntimeError(f"noise calls exhausted (last call {self._last})")
        current, self._pending = self._pending, None
        self._pending = self._submit()
        return current.result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "PrefetchedNoise":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
