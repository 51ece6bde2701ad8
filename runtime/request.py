"""The request gate: one check of what a caller asks a bundle for, shared by the Python API (``Sampler``), the CLI,
Ray and the Triton model. A request is (seed, first_sample, num, conditioning): ``num`` samples with global indices
``first_sample .. first_sample + num - 1`` inside [0, 2^64), a seed below 2^64, and exactly the conditioning
inputs the bundle names, each float32 [*sample_shape] (shared by all samples) or [num, *sample_shape], finite."""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from vpsde.runtime.errors import InputError
from vpsde.runtime.manifest import Manifest

U64 = 2**64


def count(value, name: str, lo: int, hi: int | None, optional: bool = False) -> int | None:
    """An integer argument in [lo, hi] (``hi`` None: no upper bound): Python or numpy integers only (1.5, "3" and
    True are refused, not truncated or coerced); None passes when ``optional``."""
    if value is None and optional:
        return None
    if isinstance(value, bool):
        raise InputError(f"{name} must be an integer, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise InputError(f"{name} must be an integer, got {value!r:.40}") from None
    if hi is None and value < lo:
        raise InputError(f"{name} must be >= {lo}, got {value}")
    if hi is not None and not lo <= value <= hi:
        raise InputError(f"{name} must be in [{lo}, {hi}], got {value}")
    return value


@dataclass(frozen=True)
class Request:
    """A checked request; ``conditioning`` maps each name the bundle takes to float32 [*S] or [num, *S]."""

    seed: int
    first_sample: int
    num: int
    conditioning: Mapping[str, np.ndarray] = field(default_factory=dict)

    def conditioning_for(self, start: int, size: int, sample_shape: tuple[int, ...]) -> dict[str, np.ndarray]:
        """The conditioning of samples ``start .. start + size - 1`` (global indices): float32 [size, *S] each."""
        lo = start - self.first_sample
        return {k: v[lo:lo + size] if v.ndim == len(sample_shape) + 1 else np.broadcast_to(v, (size, *sample_shape))
                for k, v in self.conditioning.items()}


def check_request(manifest: Manifest, seed, first_sample, num, conditioning: Mapping[str, np.ndarray] | None = None,
                  *, max_num: int | None = None, where: str = "") -> Request:
    """The request, checked (see the module docstring); ``max_num`` bounds ``num`` (a server's limit); ``where``
    prefixes the messages (e.g. "request 3: "). Raises :class:`InputError` with one line."""
    num = count(num, f"{where}num", 1, max_num)
    seed = count(seed, f"{where}seed", 0, U64 - 1)
    first_sample = count(first_sample, f"{where}first_sample", 0, U64 - 1)
    if first_sample > U64 - num:
        raise InputError(f"{where}sample indices first_sample .. first_sample + num - 1 must lie in [0, 2^64), got "
                         f"first_sample = {first_sample} and num = {num}")
    return Request(seed, first_sample, num, check_conditioning(manifest, conditioning, num, where))


def check_conditioning(manifest: Manifest, conditioning: Mapping[str, np.ndarray] | None, num: int,
                       where: str = "") -> dict[str, np.ndarray]:
    """Exactly the conditioning inputs ``manifest`` names, each float32 [*S] or [num, *S] (C-contiguous), finite."""
    wanted, given = list(manifest.sampler.conditioning), dict(conditioning or {})
    if sorted(given) != sorted(wanted):
        raise InputError(f"{where}this bundle ({manifest.sampler.name}) takes conditioning inputs {wanted or 'none'}, "
                         f"got {sorted(given) or 'none'}")
    shape = tuple(manifest.model.sample_shape)
    out = {}
    for name, arr in given.items():
        try:
            arr = np.ascontiguousarray(arr, dtype=np.float32)
        except (TypeError, ValueError) as e:
            raise InputError(f"{where}conditioning input {name!r}: expected a float array ({e})") from None
        if arr.shape not in (shape, (num, *shape)):
            raise InputError(f"{where}conditioning input {name!r}: expected shape {list(shape)} or {[num, *shape]}, "
                             f"got {list(arr.shape)}")
        if not np.isfinite(arr).all():
            raise InputError(f"{where}conditioning input {name!r} contains NaN/Inf")
        out[name] = arr
    return out
