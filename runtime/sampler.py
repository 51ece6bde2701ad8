"""Samples from a bundle: requests checked, the batches cut, host-side noise drawn (portable and seeded), and each
batch run by :class:`~vpsde.runtime.loop.DeviceLoop` over the bundle's compiled program (``runtime/program.py``
states what runs when), on the backend's device buffers.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from vpsde.runtime.backends import MAX_THREADS, open_backend
from vpsde.runtime.bundle import Bundle
from vpsde.runtime.digest import check_digest_text
from vpsde.runtime.errors import BundleError, InputError, NonFiniteError
from vpsde.runtime.likelihood import check_points, row_log_likelihood
from vpsde.runtime.loop import NAN_GUARD_CHOICES, DeviceLoop
from vpsde.runtime.manifest import Manifest
from vpsde.runtime.limits import cpu_limit, memory_limit
from vpsde.runtime.noise import GENERATORS, TORCH_ID, make_noise
from vpsde.runtime.prefetch import ChunkedNoise, PrefetchedNoise
from vpsde.runtime.progress import progress
from vpsde.runtime.request import check_request, count


DEFAULT_CPU_BATCH = 64
"""Default batch size on the CPU: the per-sample cost is flat from batch 16 to 64 and grows above it (and memory
with it, about 1.3 MB per digits sample); on a GPU the default is one batch of all samples."""


class Sampler:
    """Samples from a bundle on one backend.

    Args:
        bundle: a :class:`Bundle` or the path of a bundle directory.
        backend: "onnxruntime" (CPU by default; ``device="cuda"`` for the CUDA execution provider),
            "onnxruntime-trt" (ONNX Runtime's TensorRT execution provider, on the GPU) or "tensorrt" (engines
            from ``vpsde build``, on the GPU).
        device: "cpu" or "cuda" (default: the backend's, cpu for onnxruntime).
        nan_guard: "step" checks every graph output for NaN/Inf and raises :class:`NonFiniteError` naming the
            step; "final" checks the result only (no per-call device-to-host reads); "locate" checks the result
            and, if it is not finite, samples that batch again checking every output (the loop is deterministic:
            the same noise gives the same NaN), so the error names the step as "step" does, at no cost per step
            while nothing goes wrong; "off"; True / "auto" means "locate" on the CPU and "final" on a GPU, False
            means "off".
        noise_threads: with prefetch, how many noise calls are drawn ahead at once, each on its own thread
            (default: 1 on the CPU, where the backend uses the cores; up to 4 on a GPU, where one core's
            Philox can fall behind the step). The portable generator only; values are the same.
        prefetch_noise: draw each noise call on a worker thread while the previous graph call runs (same
            values). Default: on a GPU only; on the CPU the noise is drawn in line, ``noise_chunk`` calls per pass
            (a thread hand-off costs more than it hides there, and competes with the backend's threads).
        noise_chunk: in-line noise: how many calls one pass draws (bit-identical values; default: as many as
            fit in 4 MiB, at most 64; 1 = one call at a time).
        progress: show a progress bar over steps (only when stderr is a terminal).
        threads: intra-op CPU threads of the backend (default: the CPUs this process may use).
        cuda_graph: on a GPU, capture each graph binding once as a CUDA graph and replay it (a batch size's
            first calls capture; later calls skip the per-kernel launch cost).
        expect_digest: the bundle digest (64 hex digits, as ``vpsde inspect`` prints) the bundle must have; a
            bundle with another digest is refused.
    """

    def __init__(self, bundle: Bundle | str | os.PathLike, backend: str = "onnxruntime", device: str | None = None,
                 nan_guard: bool | str = "auto", progress: bool = True, threads: int | None = None,
                 prefetch_noise: bool | None = None, cuda_graph: bool = False, noise_threads: int | None = None,
                 expect_digest: str | None = None, noise_chunk: int | None = None) -> None:
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(Path(bundle), expect_digest=expect_digest)
        if expect_digest is not None and self.bundle.digest != check_digest_text(expect_digest, "expect_digest"):
            raise BundleError(f"{self.bundle.root}: bundle digest is {self.bundle.digest}, but {expect_digest} was "
                              "expected: this is not the bundle you pinned")
        self.manifest = self.bundle.manifest
        threads = count(threads, "threads", 1, MAX_THREADS, optional=True)
        noise_threads = count(noise_threads, "noise_threads", 1, 64, optional=True)
        self.noise_chunk = count(noise_chunk, "noise_chunk", 1, 1 << 16, optional=True)
        opened = open_backend(backend, self.bundle, device, threads, cuda_graph)
        self.device, self.runners = opened.device, opened.runners
        guard = ("auto" if nan_guard else "off") if isinstance(nan_guard, bool) else nan_guard
        if guard not in NAN_GUARD_CHOICES:
            raise InputError(f"nan_guard: expected one of {', '.join(NAN_GUARD_CHOICES)}, got {nan_guard!r}")
        self.nan_guard = ("locate" if self.device.on_host else "final") if guard == "auto" else guard
        self.loop = DeviceLoop(self.manifest, self.runners, self.device,
                               describe_graph=lambda key: str(self.bundle.graph_path(key)))
        self.prefetch_noise = (not self.device.on_host) if prefetch_noise is None else bool(prefetch_noise)
        self.noise_threads = noise_threads or (1 if self.device.on_host else max(1, min(4, cpu_limit() - 1)))
        self.progress = progress
        self.sample_shape = tuple(self.manifest.model.sample_shape)

    def sample(self, num: int, seed: int = 0, *, batch_size: int | None = None, first_sample: int = 0,
               generator: str | None = None, callback: Callable[[int, np.ndarray], None] | None = None,
               conditioning: Mapping[str, np.ndarray] | None = None, stop_after_steps: int | None = None) -> np.ndarray:
        """Draw ``num`` samples -> float32 [num, *sample_shape].

        ``batch_size`` defaults to 64 on the CPU (:data:`DEFAULT_CPU_BATCH`) and to ``num`` on a GPU and for the
        ``torch`` generator. Samples are global indices ``first_sample .. first_sample + num - 1``: with the portable generator,
        sample s is the same whatever the batch size or sharding (shard k passes its own ``first_sample``).
        ``generator`` overrides the manifest's (``"torch"`` reproduces diffusers' noise order; it depends on
        the batch, so it needs a single batch). ``callback(step, x)`` sees x after every step.
        ``conditioning``: the arrays the bundle's ``sampler.conditioning`` names (inpainting: ``known`` data in
        the model's value range and ``mask``, 1 where known), each [num, *sample_shape] or [*sample_shape]
        (shared by all samples). ``stop_after_steps``: for timing, run only the first K steps and return the
        trajectory there (not samples).
        """
        if self.loop.program.task != "sample":
            raise InputError(f"{self.bundle.root}: this bundle computes likelihoods (sampler.task "
                             f"{self.loop.program.task!r}), it does not sample: use Sampler.log_likelihood or "
                             "`vpsde likelihood`")
        request = check_request(self.manifest, seed, first_sample, num, conditioning)
        seed, first_sample, num = request.seed, request.first_sample, request.num
        generator = generator or self.manifest.noise.generator
        batch_size = self.batch_size_for(num, batch_size, generator)
        if generator not in GENERATORS:
            raise InputError(f"generator: expected one of {', '.join(GENERATORS)}, got {generator!r}")
        stop = count(stop_after_steps, "stop_after_steps", 1, None, optional=True)
        check_memory(self.manifest, num, batch_size)
        if generator == TORCH_ID and batch_size < num:
            raise InputError("the 'torch' noise generator reproduces diffusers for a single batch only; "
                             "use batch_size >= num or the portable philox generator")
        steps = min(self.manifest.sampler.steps, stop or self.manifest.sampler.steps)
        batches = [(s, min(batch_size, first_sample + num - s)) for s in range(first_sample, first_sample + num, batch_size)]
        out = np.empty((num, *self.sample_shape), dtype=np.float32)
        with progress(steps * len(batches), "sampling", "step", enabled=self.progress) as bar:
            for start, size in batches:
                noise = make_noise(generator, seed)
                lo = start - first_sample
                batch_cond = request.conditioning_for(start, size, self.sample_shape)
                x_T = noise(0, start, size, self.sample_shape)
                out[lo:lo + size] = self._run_batch(noise, x_T, start, bar, callback, batch_cond, steps)
        return out

    def log_likelihood(self, data: np.ndarray, seed: int = 0, *, batch_size: int | None = None,
                       first_sample: int = 0, stop_after_steps: int | None = None) -> np.ndarray:
        """log p(x) in nats, float64 [N], of each row x of ``data`` (float32 [N, *sample_shape], in the model's
        space), by a likelihood bundle's program (``export/likelihood.py``). Row i's Hutchinson probes are noise of
        sample ``first_sample + i`` under ``seed``: the same whatever the batch size or sharding.
        ``stop_after_steps``: for timing, run only the first K steps (the result is then not log p)."""
        if self.loop.program.task != "likelihood":
            raise InputError(f"{self.bundle.root}: this bundle samples (sampler.task {self.loop.program.task!r}); "
                             "likelihoods need a bundle exported with --sampler likelihood")
        data = check_points(data, self.manifest)
        request = check_request(self.manifest, seed, first_sample, len(data), None)
        num, generator = request.num, self.manifest.noise.generator
        batch_size = self.batch_size_for(num, batch_size, generator)
        stop = count(stop_after_steps, "stop_after_steps", 1, None, optional=True)
        check_memory(self.manifest, num, batch_size)
        steps = min(self.manifest.sampler.steps, stop or self.manifest.sampler.steps)
        out = np.empty(num, dtype=np.float64)
        with progress(steps * -(-num // batch_size), "likelihood", "step", enabled=self.progress) as bar:
            for lo in range(0, num, batch_size):
                batch = np.ascontiguousarray(data[lo:lo + batch_size])
                noise = make_noise(generator, request.seed)
                final = self._run_batch(noise, batch, request.first_sample + lo, bar, None, {}, steps)
                out[lo:lo + len(batch)] = row_log_likelihood(final)
        return out

    def batch_size_for(self, num: int, batch_size: int | None = None, generator: str | None = None) -> int:
        """The batch size :meth:`sample` uses for ``num`` samples: ``batch_size`` if given (at most ``num``), else
        :data:`DEFAULT_CPU_BATCH` on the CPU, or ``num`` on a GPU and for the ``torch`` generator."""
        generator = generator or self.manifest.noise.generator
        default = num if generator == TORCH_ID or not self.device.on_host else DEFAULT_CPU_BATCH
        return min(count(batch_size, "batch_size", 1, None, optional=True) or default, num)

    def noise_calls_per_step(self) -> int:
        """Noise calls one step of the program makes (the prior, call 0, comes before the first step)."""
        return self.loop.program.noise_calls_per_step

    def _run_batch(self, noise, x_T: np.ndarray, start: int, bar, callback, cond: dict[str, np.ndarray],
                   steps: int) -> np.ndarray:
        """The program on one batch from ``x_T`` (the prior draw, or the data of a likelihood program), samples
        ``start`` .. ``start + len(x_T) - 1``: its final output."""
        size = len(x_T)
        last_call = self.noise_calls_per_step() * steps

        def run(guard: str, on_step: Callable[[], None], callback=callback) -> np.ndarray:
            loop = lambda draw: self.loop.run(x_T, draw, cond, start, guard, callback, on_step, steps)  # noqa: E731
            if self.prefetch_noise and last_call:
                with PrefetchedNoise(noise, start, size, self.sample_shape, 1, last_call, self.noise_threads) as s:
                    return loop(lambda _call: s.take())
            if last_call:
                chunked = ChunkedNoise(noise, start, size, self.sample_shape, 1, last_call, self.noise_chunk)
                return loop(lambda _call: chunked.take())
            return loop(lambda call: noise(call, start, size, self.sample_shape))

        if self.nan_guard != "locate" or getattr(noise, "ordered", True):  # an ordered generator cannot replay
            return run("step" if self.nan_guard == "locate" else self.nan_guard, lambda: bar.update(1))
        try:
            return run("final", lambda: bar.update(1))
        except NonFiniteError as final:
            try:  # the same batch again, every output checked: the same noise gives the same NaN, at its step
                run("step", lambda: None, callback=None)
            except NonFiniteError as located:
                raise located from None
            raise final


def check_memory(manifest: Manifest, num: int, batch_size: int) -> None:
    """Refuse, before the first graph call, a request whose arrays cannot fit in the memory this process may use
    (:func:`~vpsde.runtime.limits.memory_limit`): the result [num, *sample_shape] float32 plus about a dozen
    batch-sized buffers."""
    numel = math.prod(manifest.model.sample_shape)
    need = 4 * numel * (num + 12 * batch_size)
    have = memory_limit()
    if have is not None and need > have.bytes:
        raise InputError(f"{num} samples of {list(manifest.model.sample_shape)} in batches of {batch_size} need about "
                         f"{need / 2**30:.1f} GiB, more than {have}: sample fewer at a time (--num, --batch-size) and "
                         "shard with --first-sample")
