"""The real dataset the shipped model is trained on: scikit-learn's handwritten digits (1797 images, 8x8,
values 0..16), upscaled bilinearly to 16x16 and scaled to [-1, 1]. Ships inside scikit-learn: no download."""

from __future__ import annotations

import numpy as np

VALUE_RANGE = (-1.0, 1.0)
RESOLUTION = 16
HELDOUT = 297  # images kept out of training, as the "real vs real" reference of the quality figures
SPLIT_SEED = 0


def load_digits16() -> tuple[np.ndarray, np.ndarray]:
    """All digits as float32 [1797, 1, 16, 16] in [-1, 1] and their labels int64 [1797]."""
    import torch
    from sklearn.datasets import load_digits
    from torch.nn import functional as F

    d = load_digits()
    x8 = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0  # [N, 1, 8, 8] in [0, 1]
    x16 = F.interpolate(x8, size=(RESOLUTION, RESOLUTION), mode="bilinear", align_corners=False)
    return (x16 * 2 - 1).clamp(-1, 1).numpy(), d.target.astype(np.int64)


def train_heldout_split() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Deterministic stratified split: ((x_train, y_train), (x_heldout, y_heldout)), HELDOUT held out."""
    from sklearn.model_selection import train_test_split

    x, y = load_digits16()
    x_tr, x_ho, y_tr, y_ho = train_test_split(x, y, test_size=HELDOUT, random_state=SPLIT_SEED, stratify=y)
    return (x_tr, y_tr), (x_ho, y_ho)
