"""Adapter for a diffusers ``UNet2DModel`` saved locally: a ``save_pretrained`` UNet directory or a pipeline's root
(its ``unet/``). No hub access.

The scheduler a model was trained with decides what the network predicts and on which noise schedule: read from
``scheduler/scheduler_config.json`` (a pipeline root's, or the one beside a ``unet/`` directory) when present.
``prediction_type`` "epsilon" is used as is; "v_prediction" (v = alpha eps - sigma x0) and "sample" (x0) are
turned into eps with the VP-SDE's alpha(t), sigma(t). Discrete "linear" betas ``linspace(beta_start, beta_end, N)``
are the VP-SDE with beta_min = N beta_start and beta_max = N beta_end, and must match the export's SDE; other
beta schedules (cosine, scaled-linear) are not a linear-beta VP-SDE and are refused.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from torch import nn

from vpsde.models.base import TimeLabelAdapter
from vpsde.models.sde import VPSDE

PREDICTIONS = ("epsilon", "v_prediction", "sample")
SCHEDULER_CONFIG = "scheduler_config.json"


class UNet2DNet(nn.Module):
    """``net(x, label) -> eps``: calls the UNet with the label as its (float, per-sample) timestep; a UNet that
    predicts v or x0 (``prediction``) has its output turned into eps at t = label / ``label_scale``."""

    def __init__(self, unet: nn.Module, prediction: str = "epsilon", sde: VPSDE | None = None,
                 label_scale: float = 999.0) -> None:
        super().__init__()
        self.unet, self.prediction, self.sde, self.label_scale = unet, prediction, sde or VPSDE(), float(label_scale)

    def forward(self, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        out = self.unet(x, label, return_dict=False)[0]
        if self.prediction == "epsilon":
            return out
        t = (label / self.label_scale).view(-1, *[1] * (x.dim() - 1))
        alpha, sigma = self.sde.mean_coeff(t), self.sde.std(t)
        if self.prediction == "v_prediction":  # x = alpha x0 + sigma eps, v = alpha eps - sigma x0
            return sigma * x + alpha * out
        return (x - alpha * out) / sigma  # "sample": out is x0


def find_unet(path: Path) -> tuple[Path, Path | None]:
    """(the UNet's directory, the scheduler config or None) for a pipeline root or a UNet directory."""
    if (path / "unet" / "config.json").is_file():
        unet = path / "unet"
    elif (path / "config.json").is_file():
        unet = path
    else:
        raise FileNotFoundError(f"{path}: neither a diffusers UNet directory (config.json) nor a pipeline root "
                                "(unet/config.json)")
    scheduler = unet.parent / "scheduler" / SCHEDULER_CONFIG
    return unet, scheduler if scheduler.is_file() else None


def scheduler_prediction(config_path: Path | None, sde: VPSDE) -> str:
    """The prediction type the scheduler config names, after checking its noise schedule is ``sde``'s; "epsilon"
    without a config. Raises ValueError (one line, naming the file and field) otherwise."""
    if config_path is None:
        return "epsilon"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{config_path}: not a readable scheduler config ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected a JSON object")
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in PREDICTIONS:
        raise ValueError(f"{config_path}: prediction_type {prediction!r} is not one of {', '.join(PREDICTIONS)}")
    if config.get("_class_name") == "ScoreSdeVpScheduler":
        pairs = (("beta_min", sde.beta_min), ("beta_max", sde.beta_max))
        for field, want in pairs:
            got = config.get(field, want)
            if not isinstance(got, (int, float)) or not math.isclose(got, want, rel_tol=1e-6):
                raise ValueError(f"{config_path}: {field} is {got!r}, the export's VP-SDE has {want}: pass "
                                 f"--{field.replace('_', '-')} {got}")
        return prediction
    schedule = config.get("beta_schedule", "linear")
    if schedule != "linear" or config.get("trained_betas") is not None:
        raise ValueError(f"{config_path}: beta_schedule {schedule!r}{' with trained_betas' if schedule == 'linear' else ''}"
                         " is not the VP-SDE's linear beta(t); vpsde samples linear-beta VP models only")
    n = config.get("num_train_timesteps", 1000)
    start, end = config.get("beta_start", 0.0001), config.get("beta_end", 0.02)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (n, start, end)):
        raise ValueError(f"{config_path}: num_train_timesteps, beta_start and beta_end must be numbers")
    for field, got, want in (("beta_start", n * start, sde.beta_min), ("beta_end", n * end, sde.beta_max)):
        if not math.isclose(got, want, rel_tol=1e-4):
            flag = "--beta-min" if field == "beta_start" else "--beta-max"
            raise ValueError(f"{config_path}: {field} x num_train_timesteps = {got:g}, the export's VP-SDE has "
                             f"{want:g}: pass {flag} {got:g}")
    return prediction


def load_diffusers_unet(path: str | os.PathLike, label_scale: float = 999.0,
                        sde: VPSDE | None = None) -> TimeLabelAdapter:
    """``UNet2DModel.from_pretrained(..., local_files_only=True)`` of a UNet directory or a pipeline root, as a
    ScoreModel fed label ``label_scale`` t, predicting eps whatever its scheduler's prediction type."""
    from diffusers import UNet2DModel

    sde = sde or VPSDE()
    unet_dir, scheduler = find_unet(Path(path))
    prediction = scheduler_prediction(scheduler, sde)
    unet = UNet2DModel.from_pretrained(unet_dir, local_files_only=True).eval()
    cfg = unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    return TimeLabelAdapter(UNet2DNet(unet, prediction, sde, label_scale), (cfg.in_channels, size, size),
                            scale=label_scale, name=f"diffusers-unet2d:{Path(path).name}").eval()
