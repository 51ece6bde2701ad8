"""Writing samples (a PNG grid for images, an .npz with everything needed to reproduce them) and reading
conditioning images (inpainting known data and masks)."""

from __future__ import annotations

import math
import os

import numpy as np

from vpsde.runtime.atomic import atomic_path
from vpsde.runtime.errors import InputError


def to_uint8(samples: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
    """float [N, C, H, W] in ``value_range`` -> uint8 [N, H, W, C] (clipped)."""
    lo, hi = value_range
    scaled = (np.clip(samples, lo, hi) - lo) / (hi - lo)
    return np.round(scaled * 255).astype(np.uint8).transpose(0, 2, 3, 1)


def image_grid(samples: np.ndarray, value_range: tuple[float, float], scale: int = 4, pad: int = 1,
               cols: int | None = None) -> np.ndarray:
    """Tile [N, C, H, W] samples into one uint8 image [rows*(H+pad)+pad, cols*(W+pad)+pad, C], upscaled ``scale``x;
    ``cols`` defaults to ceil(sqrt(N))."""
    if samples.ndim != 4 or samples.shape[1] not in (1, 3):
        raise ValueError(f"image grid needs samples [N, 1 or 3, H, W], got {samples.shape}")
    imgs = to_uint8(samples, value_range).repeat(scale, axis=1).repeat(scale, axis=2)
    n, h, w, c = imgs.shape
    cols = cols or math.ceil(math.sqrt(n))
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


def load_image(path: str | os.PathLike, sample_shape: tuple[int, ...], value_range: tuple[float, float] | None,
               what: str = "image") -> np.ndarray:
    """Read conditioning data -> float32 [*sample_shape] or [N, *sample_shape].

    ``.npy``: taken as is (already in the model's value range). Image files (PNG, ...): converted to grayscale
    or RGB to match C, must be exactly H x W, pixel 0..255 mapped linearly onto ``value_range``.
    Raises :class:`InputError` naming the file and what was expected.
    """
    path = str(path)
    if path.endswith(".npy"):
        try:
            arr = np.load(path, allow_pickle=False).astype(np.float32)
        except (OSError, ValueError) as e:
            raise InputError(f"{path}: cannot read {what} as .npy ({e})") from None
        if arr.shape != tuple(sample_shape) and arr.shape[1:] != tuple(sample_shape):
            raise InputError(f"{path}: {what} has shape {list(arr.shape)}, expected {list(sample_shape)} or "
                             f"[N, {', '.join(map(str, sample_shape))}]")
        return arr
    if len(sample_shape) != 3 or sample_shape[0] not in (1, 3) or value_range is None:
        raise InputError(f"{path}: an image file needs an image model (C in 1, 3 and a value range); this bundle's "
                         f"samples are {list(sample_shape)}: pass a .npy")
    from PIL import Image, UnidentifiedImageError

    c, h, w = sample_shape
    try:
        with Image.open(path) as img:
            pixels = np.asarray(img.convert("L" if c == 1 else "RGB"), dtype=np.float32)
    except (OSError, UnidentifiedImageError) as e:
        raise InputError(f"{path}: cannot read {what} ({e})") from None
    if pixels.shape[:2] != (h, w):
        raise InputError(f"{path}: {what} is {pixels.shape[1]}x{pixels.shape[0]} pixels, the model samples {w}x{h}")
    pixels = pixels.reshape(h, w, c).transpose(2, 0, 1)
    lo, hi = value_range
    return (lo + (hi - lo) * pixels / 255.0).astype(np.float32)


def load_mask(path: str | os.PathLike, sample_shape: tuple[int, ...]) -> np.ndarray:
    """Read an inpainting mask -> float32 of 0/1 (1 = known). ``.npy`` as is; images: pixel > 127 is known, and
    a grayscale mask applies to every channel."""
    path = str(path)
    if path.endswith(".npy"):
        return load_image(path, sample_shape, None, "mask")
    c = sample_shape[0] if len(sample_shape) == 3 else 1
    gray = load_image(path, (1, *sample_shape[1:]) if len(sample_shape) == 3 else sample_shape, (0.0, 255.0), "mask")
    return np.repeat((gray > 127.5).astype(np.float32), c, axis=0)
