"""The interface every score model presents to the step modules."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class ScoreModel(nn.Module):
    """A noise-predicting model in continuous VP time.

    ``forward(x, t) -> eps`` with x float32 [B, *sample_shape], t float32 [B] in (0, 1] (the SDE time, not a
    network label) and eps float32 [B, *sample_shape]; the score is -eps / std(t). Each subclass owns its
    time-label convention (how t is fed to the network), recorded in the manifest as ``time_label``.
    """

    name: str = "model"
    sample_shape: tuple[int, ...] = ()
    time_label: str = "t"
    weights_sha256: str | None = None


class TimeLabelAdapter(ScoreModel):
    """Wraps a network ``net(x, label)`` trained with the label ``scale * t`` (score_sde's continuous VP
    models use 999 t) as a :class:`ScoreModel`."""

    def __init__(
        self,
        net: nn.Module | Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        sample_shape: tuple[int, ...],
        *,
        scale: float = 999.0,
        name: str = "model",
        weights_sha256: str | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.scale = float(scale)
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.time_label = f"{self.scale:g}t"
        self.name = name
        self.weights_sha256 = weights_sha256

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(x, self.scale * t)
