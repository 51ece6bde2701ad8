"""Adapter for a diffusers ``UNet2DModel`` saved locally (``save_pretrained`` directory): no hub access."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from vpsde.models.base import TimeLabelAdapter


class UNet2DNet(nn.Module):
    """``net(x, label) -> eps``: calls the UNet with the label as its (float, per-sample) timestep."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return self.unet(x, label, return_dict=False)[0]


def load_diffusers_unet(path: str | os.PathLike, label_scale: float = 999.0) -> TimeLabelAdapter:
    """Load ``UNet2DModel.from_pretrained(path, local_files_only=True)`` as a ScoreModel fed label 999 t."""
    from diffusers import UNet2DModel

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a diffusers save_pretrained directory (no config.json)")
    unet = UNet2DModel.from_pretrained(path, local_files_only=True).eval()
    cfg = unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    return TimeLabelAdapter(UNet2DNet(unet), (cfg.in_channels, size, size), scale=label_scale,
                            name=f"diffusers-unet2d:{path.name}").eval()
