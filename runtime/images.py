"""Writing samples: a PNG grid (images only) and an .npz with everything needed to reproduce them."""

from __future__ import annotations

import math
import os

import numpy as np

from vpsde.runtime.atomic import atomic_path


def to_uint8(samples: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
    """float [N, C, H, W] in ``value_range`` -> uint8 [N, H, W, C] (clipped)."""
    lo, hi = value_range
    scaled = (np.clip(samples, lo, hi) - lo) / (hi - lo)
    return np.round(scaled * 255).astype(np.uint8).transpose(0, 2, 3, 1)


def image_grid(samples: np.ndarray, value_range: tuple[float, float], scale: int = 4, pad: int = 1) -> np.ndarray:
    """Tile [N, C, H, W] samples into one uint8 image [rows*(H+pad)+pad, cols*(W+pad)+pad, C], upscaled ``scale``x."""
    if samples.ndim != 4 or samples.shape[1] not in (1, 3):
        raise ValueError(f"image grid needs samples [N, 1 or 3, H, W], got {samples.shape}")
    imgs = to_uint8(samples, value_range).repeat(scale, axis=1).repeat(scale, axis=2)
    n, h, w, c = imgs.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for k in range(n):
        r, q = divmod(k, cols)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = imgs[k]
    return grid


def save_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write a uint8 [H, W, 1|3] image as PNG, atomically."""
    from PIL import Image

    img = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """np.savez_compressed, atomically."""
    with atomic_path(path, suffix=".tmp.npz") as tmp:
        np.savez_compressed(tmp, **arrays)
