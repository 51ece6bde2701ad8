"""Train the shipped score model: a small DDPM++-style UNet on 16x16 digits, as score_sde trains continuous
VP models (denoising score matching in the epsilon parameterisation, t ~ U(1e-5, 1), label 999 t, EMA).

    loss = E_{x0, t, z} || eps_theta(a(t) x0 + s(t) z, 999 t) - z ||^2        (mean over pixels)

Reproducible from --seed (single-threaded data order, torch.manual_seed). Writes, atomically:
    OUT/digits16.safetensors   EMA weights (float32)
    OUT/digits16.json          config: architecture, SDE, time label, data, training settings, sha256, wall time

    python -m vpsde.models.train_digits --out models/weights            # the shipped weights
    python -m vpsde.models.train_digits --out /tmp/w --quick            # seconds: a smoke run for tests
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from vpsde.models.digits_data import HELDOUT, RESOLUTION, VALUE_RANGE, train_heldout_split
from vpsde.models.sde import VPSDE
from vpsde.models.unet import SmallUNet, UNetConfig

NAME = "digits16"
SHIPPED_CONFIG = UNetConfig(in_channels=1, resolution=RESOLUTION, channels=32, channel_mult=(1, 2, 2),
                            num_res_blocks=1, attn_resolutions=(4,), dropout=0.1)
QUICK_CONFIG = replace(SHIPPED_CONFIG, channels=8, num_res_blocks=1, dropout=0.0)
T_MIN = 1e-5  # score_sde's eps for continuous training
LABEL_SCALE = 999.0


def dsm_loss(net: SmallUNet, x0: torch.Tensor, sde: VPSDE, generator: torch.Generator) -> torch.Tensor:
    """Denoising score matching, epsilon parameterisation; x0 float32 [B, C, H, W]."""
    t = T_MIN + (1 - T_MIN) * torch.rand(x0.shape[0], generator=generator)
    z = torch.randn(x0.shape, generator=generator)
    a, s = sde.mean_coeff(t)[:, None, None, None], sde.std(t)[:, None, None, None]
    return ((net(a * x0 + s * z, LABEL_SCALE * t) - z) ** 2).mean()


def train(out: Path, steps: int, batch: int, lr: float, ema_decay: float, seed: int, config: UNetConfig,
          warmup: int = 500, progress: bool = True) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    sde = VPSDE()
    (x_train, _), _ = train_heldout_split()
    data = torch.from_numpy(x_train)
    net = SmallUNet(config)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warmup))
    t0 = time.time()
    bar = tqdm(range(steps), desc=f"training {NAME}", unit="step", disable=not progress)
    running = None
    for step in bar:
        idx = torch.randint(0, data.shape[0], (batch,), generator=gen)
        loss = dsm_loss(net, data[idx], sde, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.lerp_(p, 1 - ema_decay)
        running = loss.item() if running is None else 0.99 * running + 0.01 * loss.item()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{running:.4f}")
    wall = time.time() - t0
    from vpsde.models.shipped import save_weights

    meta = {
        "name": NAME,
        "architecture": "SmallUNet",
        "unet": config.to_dict(),
        "sde": {"kind": "vp", "beta_min": sde.beta_min, "beta_max": sde.beta_max},
        "time_label": f"{LABEL_SCALE:g}t",
        "prediction": "epsilon",
        "value_range": list(VALUE_RANGE),
        "data": {"source": "sklearn.datasets.load_digits", "resolution": RESOLUTION, "upscale": "bilinear",
                 "heldout": HELDOUT, "train_images": int(data.shape[0])},
        "training": {"seed": seed, "steps": steps, "batch": batch, "lr": lr, "warmup": warmup,
                     "ema_decay": ema_decay, "t_min": T_MIN, "grad_clip": 1.0, "optimizer": "adam",
                     "final_loss_ema": running, "wall_time_s": round(wall, 1), "threads": torch.get_num_threads()},
    }
    save_weights(ema, meta, out)
    return meta


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="directory for digits16.safetensors + digits16.json")
    p.add_argument("--steps", type=int, default=12000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny model, 30 steps: a smoke run")
    args = p.parse_args(argv)
    config = QUICK_CONFIG if args.quick else SHIPPED_CONFIG
    steps = 30 if args.quick else args.steps
    meta = train(args.out, steps, 32 if args.quick else args.batch, args.lr, args.ema, args.seed, config,
                 warmup=10 if args.quick else 500)
    print(f"trained {steps} steps in {meta['training']['wall_time_s']} s; wrote {args.out}/{NAME}.safetensors")


if __name__ == "__main__":
    main()
