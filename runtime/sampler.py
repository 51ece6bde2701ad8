"""Drives a bundle's timestep loop: host-side noise in, the step graphs' outputs fed back, the final sample out.

The loop is the manifest's program, verbatim:

    x = noise(call 0)                                   # prior x_T ~ N(0, I)
    for i in range(steps):
        for graph call in program:                      # e.g. [em]
            x, x_mean = graph(x, t_i, dt_i, sqrt_neg_dt_i, noise(next call))
    return x_mean                                       # sampler.final
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from vpsde.runtime.backends import make_runner
from vpsde.runtime.bundle import Bundle
from vpsde.runtime.errors import InputError, NonFiniteError
from vpsde.runtime.noise import TORCH_ID, make_noise


class Sampler:
    """Samples from a bundle on one backend.

    Args:
        bundle: a :class:`Bundle` or the path of a bundle directory.
        backend: "onnxruntime" (CPU by default; ``device="cuda"`` for the CUDA execution provider).
        nan_guard: check every graph output for NaN/Inf and raise :class:`NonFiniteError` naming the step.
        progress: show a progress bar over steps.
        threads: intra-op CPU threads of the backend (default: all cores).
    """

    def __init__(self, bundle: Bundle | str | os.PathLike, backend: str = "onnxruntime", device: str = "cpu",
                 nan_guard: bool = True, progress: bool = True, threads: int | None = None) -> None:
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(Path(bundle))
        self.manifest = self.bundle.manifest
        self.runners = {key: make_runner(backend, self.bundle, key, device, threads) for key in self.manifest.graphs}
        self.nan_guard = nan_guard
        self.progress = progress
        self.sample_shape = tuple(self.manifest.model.sample_shape)
        sched = self.manifest.schedule
        self._schedule = {name: np.asarray(getattr(sched, name), dtype=np.float64) for name in ("t", "dt", "sqrt_neg_dt")}

    def sample(self, num: int, seed: int = 0, *, batch_size: int | None = None, first_sample: int = 0,
               generator: str | None = None, callback: Callable[[int, np.ndarray], None] | None = None) -> np.ndarray:
        """Draw ``num`` samples -> float32 [num, *sample_shape].

        Samples are global indices ``first_sample .. first_sample + num - 1``: with the portable generator,
        sample s is the same whatever the batch size or sharding (shard k passes its own ``first_sample``).
        ``generator`` overrides the manifest's (``"torch"`` reproduces diffusers' noise order; it depends on
        the batch, so it needs a single batch). ``callback(step, x)`` sees x after every step.
        """
        if num < 1:
            raise InputError(f"num must be >= 1, got {num}")
        if not 0 <= seed < 2**64:
            raise InputError(f"seed must be in [0, 2^64), got {seed}")
        if not 0 <= first_sample <= 2**64 - num:
            raise InputError(f"sample indices first_sample .. first_sample + num - 1 must lie in [0, 2^64), "
                             f"got first_sample = {first_sample}")
        generator = generator or self.manifest.noise.generator
        batch_size = min(batch_size or num, num)
        if generator == TORCH_ID and batch_size < num:
            raise InputError("the 'torch' noise generator reproduces diffusers for a single batch only; "
                             "use batch_size >= num or the portable philox generator")
        steps = self.manifest.sampler.steps
        batches = [(s, min(batch_size, first_sample + num - s)) for s in range(first_sample, first_sample + num, batch_size)]
        out = np.empty((num, *self.sample_shape), dtype=np.float32)
        with tqdm(total=steps * len(batches), desc="sampling", unit="step", disable=not self.progress, leave=False) as bar:
            for start, size in batches:
                noise = make_noise(generator, seed)
                out[start - first_sample:start - first_sample + size] = self._sample_batch(noise, start, size, bar, callback)
        return out

    def _sample_batch(self, noise, start: int, size: int, bar, callback) -> np.ndarray:
        x = noise(0, start, size, self.sample_shape)
        call = 1
        final = self.manifest.sampler.final
        for runner in self.runners.values():
            runner.activate(size)
        for i in range(self.manifest.sampler.steps):
            for pc in self.manifest.sampler.program:
                runner = self.runners[pc.graph]
                for _ in range(pc.repeat):
                    inputs = runner.inputs
                    np.copyto(inputs["x"], x)
                    for name, values in self._schedule.items():
                        if name in inputs:
                            inputs[name].fill(values[i])
                    if "noise" in inputs:
                        np.copyto(inputs["noise"], noise(call, start, size, self.sample_shape))
                        call += 1
                    outputs = runner.run()
                    if self.nan_guard:
                        self._check_finite(outputs, pc.graph, i, start, size)
                    x = outputs["x_next"]
            if callback is not None:
                callback(i, x)
            bar.update(1)
        return outputs[final].copy()

    def _check_finite(self, outputs: dict[str, np.ndarray], graph: str, step: int, start: int, size: int) -> None:
        for name, arr in outputs.items():
            if not np.isfinite(arr).all():
                bad = np.unique(np.nonzero(~np.isfinite(arr.reshape(size, -1)))[0] + start)
                raise NonFiniteError(
                    f"graph {graph!r} ({self.bundle.graph_path(graph)}) produced NaN/Inf in output {name!r} at step "
                    f"{step} (of 0..{self.manifest.sampler.steps - 1}, t = {self._schedule['t'][step]:.6g}), in samples "
                    f"{bad[:8].tolist()}{' ...' if bad.size > 8 else ''}"
                )
