"""A small DDPM++-style UNet (score_sde's NCSN++ family, cut down for 16x16 single-channel images).

Residual blocks with GroupNorm and the skip rescale 1/sqrt(2), a sinusoidal embedding of the time label,
one self-attention block at the lowest resolution, strided-conv downsampling and nearest+conv upsampling.
Only ops that export to plain ONNX (no custom ops); the batch dimension stays symbolic.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of :class:`SmallUNet`; ``resolution`` is the square image side in pixels."""

    in_channels: int = 1
    resolution: int = 16
    channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (4,)
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name, most in (("in_channels", 64), ("resolution", 4096), ("channels", 4096), ("num_res_blocks", 64)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= most:
                raise ValueError(f"{name}: expected an integer in 1..{most}, got {value!r:.40}")
        for name in ("channel_mult", "attn_resolutions"):
            value = getattr(self, name)
            if isinstance(value, list):  # to_dict()'s form
                object.__setattr__(self, name, value := tuple(value))
            if not isinstance(value, tuple) or len(value) > 8 or \
                    not all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in value):
                raise ValueError(f"{name}: expected a list of at most 8 positive integers, got {value!r:.40}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout: expected a number in [0, 1), got {self.dropout!r:.40}")

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise KeyError(f"unknown UNet config keys {sorted(unknown)}; expected a subset of {sorted(known)}")
        d = dict(d)
        for key in ("channel_mult", "attn_resolutions"):
            if isinstance(d.get(key), list):
                d[key] = tuple(d[key])
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


def timestep_embedding(label: torch.Tensor, dim: int, max_positions: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of a float label [B] -> [B, dim] (DDPM / score_sde ``get_timestep_embedding``)."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=label.device) * (-math.log(max_positions) / (half - 1)))
    args = label.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, ch // 4), ch, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_ch)
        self.norm2, self.conv2 = _norm(out_ch), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.skip(x) + h) / math.sqrt(2.0)


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.norm = _norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)
        # batched MatMul, not Einsum: ONNX Einsum has no bfloat16 (MatMul has since opset 13)
        attn = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(c), dim=-1)  # [b, i, j]
        out = (v @ attn.transpose(1, 2)).reshape(b, c, h, w)  # out[c, i] = sum_j v[c, j] attn[i, j]
        return (x + self.proj(out)) / math.sqrt(2.0)


class SmallUNet(nn.Module):
    """``forward(x [B, C, R, R] float32, label [B] float32) -> eps [B, C, R, R]`` (noise prediction)."""

    def __init__(self, config: UNetConfig = UNetConfig()) -> None:
        super().__init__()
        self.config = c = config
        ch, emb_dim = c.channels, 4 * c.channels
        self.emb = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(c.in_channels, ch, 3, padding=1)

        self.down = nn.ModuleList()
        skips, res, cur = [ch], c.resolution, ch
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                self.down.append(ResBlock(cur, ch * mult, emb_dim, c.dropout))
                cur = ch * mult
                if res in c.attn_resolutions:
                    self.down.append(AttnBlock(cur))
                skips.append(cur)
            if level != len(c.channel_mult) - 1:
                self.down.append(nn.Conv2d(cur, cur, 3, stride=2, padding=1))
                res //= 2
                skips.append(cur)

        self.mid = nn.ModuleList([ResBlock(cur, cur, emb_dim, c.dropout), AttnBlock(cur), ResBlock(cur, cur, emb_dim, c.dropout)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for _ in range(c.num_res_blocks + 1):
                self.up.append(ResBlock(cur + skips.pop(), ch * mult, emb_dim, c.dropout))
                cur = ch * mult
                if res in c.attn_resolutions:
                    self.up.append(AttnBlock(cur))
            if level != 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(cur, cur, 3, padding=1)))
                res *= 2
        self.norm_out = _norm(cur)
        self.conv_out = nn.Conv2d(cur, c.in_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        emb = self.emb(timestep_embedding(label, self.config.channels).to(x.dtype))  # fp32 sinusoid, then x's dtype
        h = self.conv_in(x)
        hs = [h]
        for layer in self.down:
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
                hs.append(h)
            elif isinstance(layer, AttnBlock):
                h = layer(h)
                hs[-1] = h
            else:  # downsampling conv
                h = layer(h)
                hs.append(h)
        h = self.mid[2](self.mid[1](self.mid[0](h, emb)), emb)
        for layer in self.up:
            if isinstance(layer, ResBlock):
                h = layer(torch.cat([h, hs.pop()], dim=1), emb)
            else:  # attention or upsampling
                h = layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))
