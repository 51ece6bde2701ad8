"""Sample quality of the shipped digits model: the eager reference vs the ONNX Runtime bundle.

Draws --num samples with --steps Euler-Maruyama steps (diffusers grid) twice, each in its own process, the two
in parallel (one thread each):
  eager — diffusers' ScoreSdeVpScheduler loop around the torch model (torch generator);
  ort   — `vpsde export` bundle on ONNX Runtime CPU (portable philox noise).
Then reports, with models/digits_eval.py, the classifier's confidence and class balance and the Fréchet
distance to the training set (with a bootstrap standard error), next to held-out real digits and a
same-size subsample of each generated set. Writes OUT/quality.json, OUT/{eager,ort}.npz and grid PNGs.

    python bench/digits_quality.py --num 1000 --steps 1000 --out out/quality
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

import numpy as np


def sample_eager(num: int, steps: int, seed: int, batch: int) -> np.ndarray:
    import torch
    from diffusers.schedulers.deprecated.scheduling_sde_vp import ScoreSdeVpScheduler

    from vpsde.models.shipped import load_shipped

    torch.set_num_threads(1)
    model = load_shipped()
    out = []
    for start in range(0, num, batch):
        n = min(batch, num - start)
        sched = ScoreSdeVpScheduler(num_train_timesteps=1000)
        sched.set_timesteps(steps)
        g = torch.Generator().manual_seed(seed + start)
        x = torch.randn((n, 1, 16, 16), generator=g)
        with torch.inference_mode():
            for t in sched.timesteps:
                tv = t.repeat(n)
                x, x_mean = sched.step_pred(model(x, tv), x, tv, generator=g)
        out.append(x_mean.numpy())
    return np.concatenate(out)


def sample_ort(bundle: str, num: int, seed: int, batch: int) -> np.ndarray:
    from vpsde.runtime import Sampler

    return Sampler(bundle, progress=False, threads=1).sample(num, seed=seed, batch_size=batch)


def _child(kind: str, args: dict, bundle: str, out: str) -> None:
    t0 = time.perf_counter()
    x = sample_eager(args["num"], args["steps"], args["seed"], args["batch"]) if kind == "eager" else \
        sample_ort(bundle, args["num"], args["seed"], args["batch"])
    np.savez_compressed(out, samples=x, seconds=time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num", type=int, default=1000)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--out", type=Path, default=Path("out/quality"))
    p.add_argument("--reuse", action="store_true", help="score existing OUT/{eager,ort}.npz instead of sampling")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    if not args.reuse:
        from vpsde.export import VPSDE, export_bundle, load_model

        bundle = args.out / "bundle"
        export_bundle(load_model("digits", VPSDE(std_formula="diffusers")), bundle, steps=args.steps,
                      grid="diffusers", value_range=(-1, 1), overwrite=True, log=lambda m: print(m, file=sys.stderr))
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_child, args=(k, vars(args) | {"out": None}, str(bundle), str(args.out / f"{k}.npz")))
                 for k in ("eager", "ort")]
        print(f"sampling {args.num} x {args.steps} steps, eager and ort in parallel...", file=sys.stderr)
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
            if proc.exitcode:
                raise SystemExit(f"sampling process failed with exit code {proc.exitcode}")

    from vpsde.models.digits_data import train_heldout_split
    from vpsde.models.digits_eval import DigitsYardstick
    from vpsde.runtime.images import image_grid, save_png

    yard = DigitsYardstick.fit()
    _, (x_ho, _) = train_heldout_split()
    results = {"classifier_heldout_accuracy": yard.heldout_accuracy, "heldout_real": yard.report(x_ho)}
    kinds = [k for k in ("eager", "ort") if (args.out / f"{k}.npz").is_file()]
    for kind in kinds:
        with np.load(args.out / f"{kind}.npz") as f:
            x, seconds = f["samples"], float(f["seconds"])
        results[kind] = yard.report(x) | {"seconds": seconds,
                                           f"fd_to_train_first_{len(x_ho)}": yard.frechet(x[:len(x_ho)])}
        save_png(args.out / f"{kind}_grid.png", image_grid(x[:100], (-1, 1)))
    (args.out / "quality.json").write_text(json.dumps(results, indent=2))
    print(f"classifier held-out accuracy {yard.heldout_accuracy:.3f}")
    print(f"{'set':<14}{'n':>6}{'FD to train':>13}{'± boot SE':>11}{f'FD (n={len(x_ho)})':>13}{'confidence':>12}{'max class dev':>15}")
    ho = results["heldout_real"]
    print(f"{'held-out real':<14}{ho['n']:>6}{ho['fd_to_train']:>13.3f}{ho['fd_bootstrap_se']:>11.3f}{ho['fd_to_train']:>13.3f}"
          f"{ho['mean_confidence']:>12.3f}{ho['class_balance_max_dev']:>15.3f}")
    for kind in kinds:
        r = results[kind]
        print(f"{kind + ' EM':<14}{r['n']:>6}{r['fd_to_train']:>13.3f}{r['fd_bootstrap_se']:>11.3f}"
              f"{r[f'fd_to_train_first_{len(x_ho)}']:>13.3f}{r['mean_confidence']:>12.3f}{r['class_balance_max_dev']:>15.3f}")
    print(f"wrote {args.out}/quality.json and grids")


if __name__ == "__main__":
    main()
