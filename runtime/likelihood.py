"""What `vpsde likelihood` reads and reports: data in, log-likelihoods and bits/dim out.

Two kinds of data. Real-valued points (a float .npy, e.g. the mixture) are taken as they are, in the model's space:
nll = -log p(x) in nats and bits/dim = nll / (D ln 2), no offset. Images (a uint8 .npy [N, *sample_shape] or a
directory of PNG files) follow score_sde: pixel k in 0..255 is dequantized to x = lo + (hi - lo) (k + u) / 256 with
u uniform in (0, 1) (u = Phi(z), z the portable noise call 0 of the sample, so the same per sample index whatever the
batch), and bits/dim = nll / (D ln 2) + 8 - log2(hi - lo) for the bundle's model.value_range [lo, hi]: the change of
variables from the 256 bins of width (hi - lo) / 256 to the model's space (7 for [-1, 1], score_sde's
"offset = 7 - inverse_scaler(-1)"; 8 for [0, 1]). The result is then an upper bound on the discrete data's bits/dim.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vpsde.runtime.errors import InputError
from vpsde.runtime.manifest import Manifest
from vpsde.runtime.noise import make_noise

IMAGE_SUFFIXES = (".png",)


@dataclass(frozen=True)
class Data:
    """Points to score: float32 [N, *sample_shape] in the model's space; ``pixels`` uint8 (images) or None (real)."""

    points: np.ndarray | None
    pixels: np.ndarray | None
    source: str

    @property
    def is_image(self) -> bool:
        return self.pixels is not None

    def __len__(self) -> int:
        return len(self.pixels if self.pixels is not None else self.points)

    def model_points(self, value_range: tuple[float, float] | None, seed: int, first_sample: int,
                     generator: str) -> np.ndarray:
        """float32 [N, *sample_shape]: the points as they are, or the images dequantized (:func:`dequantize`)."""
        return dequantize(self.pixels, value_range, seed, first_sample, generator) if self.is_image else self.points


def load_data(path: str | os.PathLike, sample_shape: tuple[int, ...],
              value_range: tuple[float, float] | None) -> Data:
    """A .npy file (float: real-valued points; uint8: images) or a directory of PNG images, checked against the
    model's sample shape and value range (a bundle's model.*, or what a server says of it; one-line
    :class:`InputError` naming the file otherwise)."""
    path = Path(path)
    shape = tuple(sample_shape)
    if path.is_dir():
        return Data(None, _check_pixels(_read_pngs(path, shape), shape, value_range, path), str(path))
    if path.suffix != ".npy":
        raise InputError(f"{path}: expected a .npy file or a directory of PNG images")
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable .npy array ({e})") from None
    if arr.dtype == np.uint8:
        return Data(None, _check_pixels(arr, shape, value_range, path), str(path))
    if arr.dtype not in (np.float32, np.float64):
        raise InputError(f"{path}: expected float32 or float64 points, or uint8 images, got dtype {arr.dtype}")
    return Data(_check_points(arr.astype(np.float32), shape, value_range, str(path)), None, str(path))


def check_points(points: np.ndarray, manifest: Manifest, what: str = "data") -> np.ndarray:
    """``points`` as the likelihood program takes them (float32 [N >= 1, *sample_shape], finite, inside
    model.value_range when the bundle has one) or a one-line :class:`InputError` naming ``what``."""
    return _check_points(points, tuple(manifest.model.sample_shape), manifest.model.value_range, what)


def _check_points(points: np.ndarray, shape: tuple[int, ...], vr: tuple[float, float] | None,
                  what: str) -> np.ndarray:
    if not isinstance(points, np.ndarray) or points.dtype != np.float32 or points.shape[1:] != shape \
            or points.ndim != len(shape) + 1 or not len(points):
        got = f"{points.dtype} {list(points.shape)}" if isinstance(points, np.ndarray) else type(points).__name__
        raise InputError(f"{what}: expected float32 points [N >= 1, {', '.join(map(str, shape))}], got {got}")
    bad = ~np.isfinite(points.reshape(len(points), -1)).all(axis=1)
    if bad.any():
        raise InputError(f"{what}: rows {np.nonzero(bad)[0][:8].tolist()} hold NaN or Infinity")
    if vr is not None and (points.min() < vr[0] or points.max() > vr[1]):
        raise InputError(f"{what}: values span [{points.min():.4g}, {points.max():.4g}], outside the model's value "
                         f"range {list(vr)} (model.value_range); images go in as uint8")
    return points


def _read_pngs(root: Path, shape: tuple[int, ...]) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"{root}: no PNG files")
    if len(shape) != 3 or shape[0] not in (1, 3):
        raise InputError(f"{root}: images need a [1|3, H, W] model, this one takes {list(shape)}")
    out = np.empty((len(files), *shape), dtype=np.uint8)
    for i, f in enumerate(files):
        try:
            with Image.open(f) as img:
                arr = np.asarray(img.convert("L" if shape[0] == 1 else "RGB"))
        except (OSError, UnidentifiedImageError) as e:
            raise InputError(f"{f}: not a readable image ({e})") from None
        if arr.shape[:2] != shape[1:]:
            raise InputError(f"{f}: expected {shape[2]} x {shape[1]} pixels, got {arr.shape[1]} x {arr.shape[0]}")
        out[i] = arr[None] if shape[0] == 1 else arr.transpose(2, 0, 1)
    return out


def _check_pixels(arr: np.ndarray, shape: tuple[int, ...], value_range: tuple[float, float] | None,
                  path: Path) -> np.ndarray:
    if arr.ndim != len(shape) + 1 or arr.shape[1:] != shape or not len(arr):
        raise InputError(f"{path}: expected uint8 images [N >= 1, {', '.join(map(str, shape))}], got {list(arr.shape)}")
    if value_range is None:
        raise InputError(f"{path}: images need the model's value range, and this bundle has none (model.value_range "
                         "is null): pass real-valued points as a float .npy")
    return arr


def dequantize(pixels: np.ndarray, value_range: tuple[float, float], seed: int, first_sample: int,
               generator: str) -> np.ndarray:
    """uint8 [N, *shape] -> float32 points lo + (hi - lo) (k + u) / 256, u = Phi(z) in (0, 1) with z noise call 0 of
    samples first_sample .. first_sample + N - 1 (module docstring); float64 arithmetic, rounded once."""
    from math import erf

    z = make_noise(generator, seed)(0, first_sample, len(pixels), pixels.shape[1:]).astype(np.float64)
    u = 0.5 * (1.0 + np.vectorize(erf, otypes=[np.float64])(z / math.sqrt(2.0)))
    lo, hi = value_range
    return (lo + (hi - lo) * (pixels.astype(np.float64) + u) / 256.0).astype(np.float32)


def row_log_likelihood(final: np.ndarray) -> np.ndarray:
    """A likelihood program's final output (float32 [N, *sample_shape]: log p of the prior at x(1) plus the
    integrated divergence, per element) -> log p(x) in nats, float64 [N]: each row summed in float64 in element
    order (cumsum adds in sequence, sum would pair), the order of the C++ host, so every host gives the same bits."""
    return np.cumsum(final.reshape(len(final), -1), axis=1, dtype=np.float64)[:, -1]


def bits_offset(value_range: tuple[float, float] | None, is_image: bool) -> float:
    """What bits/dim adds to nll / (D ln 2): 8 - log2(hi - lo) for images, 0 for real-valued points."""
    return 8.0 - math.log2(value_range[1] - value_range[0]) if is_image else 0.0


def bits_per_dim(nll: np.ndarray, numel: int, value_range: tuple[float, float] | None, is_image: bool) -> np.ndarray:
    """nats [N] -> bits/dim [N]: nll / (D ln 2) + :func:`bits_offset` (module docstring)."""
    return nll / (numel * math.log(2.0)) + bits_offset(value_range, is_image)


def figures(logp: np.ndarray, data: Data, value_range: tuple[float, float] | None) -> dict:
    """likelihood.json's figures for the log p (float64 [N], nats) of ``data``: what the inputs were, the bits/dim
    offset, and :func:`summarize`'s mean, standard error and per-input lists."""
    nll = -logp
    numel = int(np.prod(data.pixels.shape[1:] if data.is_image else data.points.shape[1:]))
    bpd = bits_per_dim(nll, numel, value_range, data.is_image)
    return {"inputs": len(nll), "kind": "images (dequantized)" if data.is_image else "real-valued points",
            "bits_per_dim_offset": bits_offset(value_range, data.is_image), **summarize(nll, bpd)}


def summarize(nll: np.ndarray, bpd: np.ndarray) -> dict:
    """likelihood.json's figures: mean bits/dim and its standard error (NaN for one input), mean nll, and the
    per-input nll (nats) and bpd lists."""
    n = len(bpd)
    stderr = float(bpd.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return {"mean_bpd": float(bpd.mean()), "stderr_bpd": stderr, "mean_nll": float(nll.mean()),
            "nll": nll.tolist(), "bpd": bpd.tolist()}
