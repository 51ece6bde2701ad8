"""The score networks of Song et al.'s score_sde (PyTorch port, score_sde_pytorch): DDPM++ (their ``ncsnpp`` model
with the DDPM++ settings) and DDPM (their ``ddpm`` model), written here so that their checkpoints load key for key.

Layout contract (what makes the state dicts match): the network holds a float64 buffer ``sigmas`` [num_scales]
and one ``all_modules`` list whose entries are, in order, the two time-embedding Linear layers, the input conv,
the down path (residual blocks, attention at the listed resolutions, a downsampling block between levels), the
middle (block, attention, block), the up path (num_res_blocks + 1 blocks per level on the concatenated skip,
attention, an upsampling block between levels), and the output GroupNorm and conv. Inside the blocks the
submodules are named and registered as theirs: ``GroupNorm_0, Conv_0, Dense_0, GroupNorm_1, Dropout_0, Conv_1``
then the shortcut (``Conv_2``: DDPM++; ``NIN_0``: DDPM), attention ``GroupNorm_0, NIN_0..NIN_3``. A NIN layer
keeps its weight ``W`` as [in, out] and computes x . W over channels.

Only what the published VP configs use is built: DDPM++ = BigGAN residual blocks (resampling inside the block,
nearest/average, no FIR), skip rescaling by 1/sqrt(2), sinusoidal (positional) time embedding, no progressive
paths; DDPM = DDPM residual blocks with conv resampling layers. The output is the network's raw output: for
continuously trained VP models that is eps (score = -output / std(t)), fed the label 999 t.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

FAMILIES = ("ddpmpp", "ddpm")


CONFIG_LIMITS = {"nf": 2048, "num_res_blocks": 64, "image_size": 4096, "num_channels": 64, "num_scales": 100_000}
"""Largest value of each integer field: far above any published config, small enough that a network is built (or
refused for memory) rather than ending in the allocator."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class ScoreSdeConfig:
    """Hyperparameters of one score_sde network (names as in their ``config.model`` / ``config.data``)."""

    family: str = "ddpmpp"
    nf: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 4
    attn_resolutions: tuple[int, ...] = (16,)
    image_size: int = 32
    num_channels: int = 3
    dropout: float = 0.1
    centered: bool = True
    resamp_with_conv: bool = True
    num_scales: int = 1000
    sigma_min: float = 0.01
    sigma_max: float = 50.0

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family: expected one of {FAMILIES}, got {self.family!r}")
        for name, most in CONFIG_LIMITS.items():
            value = getattr(self, name)
            if not _is_int(value) or not 1 <= value <= most:
                raise ValueError(f"{name}: expected an integer in 1..{most}, got {value!r:.40}")
        for name in ("ch_mult", "attn_resolutions"):
            value = getattr(self, name)
            if isinstance(value, list):  # to_dict()'s form
                object.__setattr__(self, name, value := tuple(value))
            if not isinstance(value, tuple) or len(value) > 8 or not all(_is_int(m) and 1 <= m <= 64 * 1024 for m in value):
                raise ValueError(f"{name}: expected a list of at most 8 positive integers, got {value!r:.40}")
        if not self.ch_mult or max(self.ch_mult) > 64:
            raise ValueError(f"ch_mult: expected 1 to 8 multipliers of at most 64, got {self.ch_mult!r}")
        for name in ("centered", "resamp_with_conv"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected true or false, got {getattr(self, name)!r:.40}")
        for name in ("dropout", "sigma_min", "sigma_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name}: expected a number, got {value!r:.40}")
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"sigma_min, sigma_max: expected 0 < sigma_min < sigma_max, got {self.sigma_min}, "
                             f"{self.sigma_max}")
        if self.image_size % 2 ** (len(self.ch_mult) - 1):
            raise ValueError(f"image_size {self.image_size} is not divisible by 2^{len(self.ch_mult) - 1}")
        if self.nf * min(self.ch_mult) < 32 and self.family == "ddpm":
            raise ValueError("ddpm uses GroupNorm with 32 groups: nf * min(ch_mult) must be >= 32")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout: expected [0, 1), got {self.dropout!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ScoreSdeConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config field(s) {unknown}; expected some of {sorted(known)}")
        if not isinstance(d, dict):
            raise ValueError(f"config: expected a JSON object, got {type(d).__name__}")
        d = {k: tuple(v) if k in ("ch_mult", "attn_resolutions") and isinstance(v, list) else v for k, v in d.items()}
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


PRESETS: dict[str, ScoreSdeConfig] = {
    # configs/vp/cifar10_ddpmpp_continuous.py (61.8 M parameters)
    "cifar10_ddpmpp_continuous": ScoreSdeConfig(),
    # configs/vp/cifar10_ddpmpp_deep_continuous.py
    "cifar10_ddpmpp_deep_continuous": ScoreSdeConfig(num_res_blocks=8),
    # configs/vp/ddpm/cifar10_continuous.py (35.2 M parameters)
    "cifar10_ddpm_continuous": ScoreSdeConfig(family="ddpm", num_res_blocks=2),
}


def new_net(config: ScoreSdeConfig) -> "ScoreSdeNet":
    """``ScoreSdeNet(config)``; torch's allocator failing becomes MemoryError (the CLI's out-of-memory line)."""
    try:
        return ScoreSdeNet(config)
    except RuntimeError as e:
        if "alloc" in str(e).lower() or "memory" in str(e).lower():
            raise MemoryError(f"the {config.family} network of this config does not fit in memory") from None
        raise


def config_from_spec(text: str) -> ScoreSdeConfig:
    """A preset name (:data:`PRESETS`) or a JSON object of :class:`ScoreSdeConfig` fields."""
    if text in PRESETS:
        return PRESETS[text]
    if text.lstrip().startswith("{"):
        try:
            return ScoreSdeConfig.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise ValueError(f"config JSON: {e}") from None
    raise ValueError(f"config {text!r}: expected a preset ({', '.join(PRESETS)}) or a JSON object")


# -- layers ----------------------------------------------------------------------------------------------------
def timestep_embedding(labels: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of float labels [B] -> [B, dim]: sin then cos of labels * exp(-log(max_period) k /
    (dim/2 - 1)), k = 0 .. dim/2 - 1 (the DDPM / transformer embedding; zero-padded to odd dim)."""
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float32, device=labels.device) * (-math.log(max_period) / (half - 1)))
    arg = labels.float()[:, None] * freq[None, :]
    emb = torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def group_norm(channels: int, groups: int | None = None) -> nn.GroupNorm:
    """GroupNorm with eps 1e-6; ``groups`` default min(channels // 4, 32) (DDPM++), DDPM passes 32."""
    return nn.GroupNorm(num_groups=groups or min(channels // 4, 32), num_channels=channels, eps=1e-6)


class NIN(nn.Module):
    """A 1x1 'network in network' layer: y[b, o, h, w] = sum_c x[b, c, h, w] W[c, o] + b[o]; W is [in, out] (the
    checkpoints' layout). Computed as a 1 x 1 convolution, not an einsum: ONNX's Einsum takes no bfloat16 (so a
    bf16 export failed), and a Conv is what ONNX Runtime and TensorRT run fastest."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.empty(in_dim, out_dim))
        self.b = nn.Parameter(torch.zeros(out_dim))
        nn.init.xavier_uniform_(self.W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.W.t()[:, :, None, None], self.b)


class AttnBlock(nn.Module):
    """Self-attention over the H x W positions, single head of width C, residual; ``rescale``: (x + h) / sqrt(2)."""

    def __init__(self, channels: int, groups: int | None, rescale: bool) -> None:
        super().__init__()
        self.GroupNorm_0 = group_norm(channels, groups)
        self.NIN_0, self.NIN_1, self.NIN_2, self.NIN_3 = (NIN(channels, channels) for _ in range(4))
        self.rescale = rescale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        h = self.GroupNorm_0(x)
        q, k, v = self.NIN_0(h).flatten(2), self.NIN_1(h).flatten(2), self.NIN_2(h).flatten(2)  # [B, C, HW]
        weights = torch.softmax(torch.bmm(q.transpose(1, 2), k) * c ** -0.5, dim=-1)  # [B, query p, key q]
        h = self.NIN_3(torch.bmm(v, weights.transpose(1, 2)).reshape(b, c, hgt, wid))  # [B, C, p]
        return (x + h) / math.sqrt(2.0) if self.rescale else x + h


class ResBlock(nn.Module):
    """Residual block with a time-embedding bias between its two convs.

    ``kind="biggan"`` (DDPM++): GroupNorm min(C/4, 32), optional nearest-up / average-down resampling of both
    paths inside the block, a 1x1 conv shortcut ``Conv_2`` when the shape changes, output (x + h) / sqrt(2).
    ``kind="ddpm"``: GroupNorm 32, a NIN shortcut ``NIN_0`` when channels change, output x + h."""

    def __init__(self, kind: str, in_ch: int, out_ch: int | None, temb_dim: int, dropout: float,
                 up: bool = False, down: bool = False) -> None:
        super().__init__()
        out_ch = out_ch or in_ch
        groups = 32 if kind == "ddpm" else None
        self.kind, self.up, self.down = kind, up, down
        self.GroupNorm_0 = group_norm(in_ch, groups)
        self.Conv_0 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.Dense_0 = nn.Linear(temb_dim, out_ch)
        self.GroupNorm_1 = group_norm(out_ch, groups)
        self.Dropout_0 = nn.Dropout(dropout)
        self.Conv_1 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.shortcut = in_ch != out_ch or up or down
        if self.shortcut:
            if kind == "ddpm":
                self.NIN_0 = NIN(in_ch, out_ch)
            else:
                self.Conv_2 = nn.Conv2d(in_ch, out_ch, 1)

    @staticmethod
    def _resample(x: torch.Tensor, up: bool) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2.0, mode="nearest") if up else F.avg_pool2d(x, 2)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.GroupNorm_0(x))
        if self.up or self.down:
            h, x = self._resample(h, self.up), self._resample(x, self.up)
        h = self.Conv_0(h) + self.Dense_0(F.silu(temb))[:, :, None, None]
        h = self.Conv_1(self.Dropout_0(F.silu(self.GroupNorm_1(h))))
        if self.shortcut:
            x = self.NIN_0(x) if self.kind == "ddpm" else self.Conv_2(x)
        return x + h if self.kind == "ddpm" else (x + h) / math.sqrt(2.0)


class Resample(nn.Module):
    """DDPM's resampling layers: ``up``: nearest x2 then a 3x3 conv; down: a 3x3 stride-2 conv on the input padded
    by one row and column at the bottom and right (TensorFlow's 'SAME')."""

    def __init__(self, channels: int, up: bool) -> None:
        super().__init__()
        self.up = up
        self.Conv_0 = nn.Conv2d(channels, channels, 3, stride=1 if up else 2, padding=1 if up else 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return self.Conv_0(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.Conv_0(F.pad(x, (0, 1, 0, 1)))


# -- the network ---------------------------------------------------------------------------------------------------
class ScoreSdeNet(nn.Module):
    """DDPM++ or DDPM (``config.family``): ``forward(x [B, C, H, W], labels [B]) -> [B, C, H, W]``, labels being
    the network's time input (999 t for continuous VP training). Inputs in [0, 1] when ``config.centered`` is
    false (mapped to [-1, 1] first, as theirs)."""

    def __init__(self, config: ScoreSdeConfig) -> None:
        super().__init__()
        self.config = c = config
        kind = "biggan" if c.family == "ddpmpp" else "ddpm"
        attn_groups, attn_rescale = (None, True) if kind == "biggan" else (32, False)
        sigmas = torch.exp(torch.linspace(math.log(c.sigma_max), math.log(c.sigma_min), c.num_scales,
                                          dtype=torch.float64))
        self.register_buffer("sigmas", sigmas)  # theirs; unused by VP models (scale_by_sigma is off)
        temb_dim = 4 * c.nf
        block = lambda i, o=None, **kw: ResBlock(kind, i, o, temb_dim, c.dropout, **kw)  # noqa: E731
        attn = lambda ch: AttnBlock(ch, attn_groups, attn_rescale)  # noqa: E731
        resolutions = [c.image_size // 2**i for i in range(len(c.ch_mult))]
        mods: list[nn.Module] = [nn.Linear(c.nf, temb_dim), nn.Linear(temb_dim, temb_dim),
                                 nn.Conv2d(c.num_channels, c.nf, 3, padding=1)]
        skips, ch = [c.nf], c.nf
        for level, mult in enumerate(c.ch_mult):
            for _ in range(c.num_res_blocks):
                mods.append(block(ch, c.nf * mult))
                ch = c.nf * mult
                if resolutions[level] in c.attn_resolutions:
                    mods.append(attn(ch))
                skips.append(ch)
            if level != len(c.ch_mult) - 1:
                mods.append(block(ch, down=True) if kind == "biggan" else Resample(ch, up=False))
                skips.append(ch)
        mods += [block(ch), attn(ch), block(ch)]
        for level in reversed(range(len(c.ch_mult))):
            for _ in range(c.num_res_blocks + 1):
                mods.append(block(ch + skips.pop(), c.nf * c.ch_mult[level]))
                ch = c.nf * c.ch_mult[level]
            if resolutions[level] in c.attn_resolutions:
                mods.append(attn(ch))
            if level != 0:
                mods.append(block(ch, up=True) if kind == "biggan" else Resample(ch, up=True))
        mods += [group_norm(ch, 32 if kind == "ddpm" else None), nn.Conv2d(ch, c.num_channels, 3, padding=1)]
        self.all_modules = nn.ModuleList(mods)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        c, mods = self.config, iter(self.all_modules)
        first = next(mods)  # the embedding in float32, then in the network's dtype (fp16/bf16 exports)
        temb = first(timestep_embedding(labels, c.nf).to(first.weight.dtype))
        temb = next(mods)(F.silu(temb))
        if not c.centered:
            x = 2.0 * x - 1.0
        hs = [next(mods)(x)]
        for level in range(len(c.ch_mult)):
            for _ in range(c.num_res_blocks):
                h = next(mods)(hs[-1], temb)
                if h.shape[-1] in c.attn_resolutions:
                    h = next(mods)(h)
                hs.append(h)
            if level != len(c.ch_mult) - 1:
                down = next(mods)
                hs.append(down(hs[-1], temb) if isinstance(down, ResBlock) else down(hs[-1]))
        h = next(mods)(hs[-1], temb)
        h = next(mods)(h)
        h = next(mods)(h, temb)
        for level in reversed(range(len(c.ch_mult))):
            for _ in range(c.num_res_blocks + 1):
                h = next(mods)(torch.cat([h, hs.pop()], dim=1), temb)
            if h.shape[-1] in c.attn_resolutions:
                h = next(mods)(h)
            if level != 0:
                up = next(mods)
                h = up(h, temb) if isinstance(up, ResBlock) else up(h)
        h = F.silu(next(mods)(h))
        return next(mods)(h)


def parameter_count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
