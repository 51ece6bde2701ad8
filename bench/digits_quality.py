"""Sample quality of the shipped digits model, per sampler and NFE budget.

Each run is SAMPLER[/OPTION=VALUE,...]:NFE[@NUM] and samples in its own process (one thread; --jobs of them in
parallel); options go to the export, e.g. dpmpp-2m/denoise_final=1:20, pc/coupling=batch:1000, unipc/grid=tuned:10 or
dpmpp-2m/precision=fp16:20
(the fp16 graph run by ONNX Runtime's CPU provider; a bf16 bundle runs on the openvino backend, vpsde[openvino]):
  eager-em:N  — diffusers' ScoreSdeVpScheduler loop around the torch model (torch generator), N steps;
  S:NFE       — a bundle exported with `--sampler S` and the step count that spends NFE model evaluations
                (pc: NFE/2 steps with one corrector step; ode-heun: NFE/2), sampled on ONNX Runtime CPU with
                the portable philox noise; the sampler's default grid.
Then reports, with models/digits_eval.py, the Fréchet distance to the training set in the classifier's
feature space (with a bootstrap standard error; also on the first n = 297 samples, the held-out set's size),
the classifier's confidence and class balance, next to held-out real digits. Writes OUT/quality.json,
OUT/<run>.npz and OUT/<run>_grid.png. Existing .npz files are scored again without sampling (--resample to redo).

    python bench/digits_quality.py eager-em:1000 em:1000 pc:1000@500 ode-heun:20 dpmpp-2m:10 dpmpp-2m:20 --num 1000
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

import numpy as np


def parse_run(spec: str) -> tuple[str, int, int | None]:
    """'pc:1000@500' -> ('pc', 1000, 500)."""
    try:
        head, _, num = spec.partition("@")
        sampler, nfe = head.split(":")
        return sampler, int(nfe), int(num) if num else None
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected SAMPLER:NFE[@NUM], got {spec!r}") from None


def run_name(sampler: str, nfe: int) -> str:
    return f"{sampler.replace('/', '-').replace('=', '-').replace(',', '-')}-{nfe}"


def split_options(sampler: str) -> tuple[str, dict]:
    """'dpmpp-2m/denoise_final=1' -> ('dpmpp-2m', {'denoise_final': True})."""
    name, _, opts = sampler.partition("/")
    parse = {"coupling": str, "snr": float, "corrector_steps": int, "denoise_final": lambda v: bool(int(v)),
             "precision": str, "grid": str, "order": int, "variant": str}
    unknown = [item.split("=")[0] for item in filter(None, opts.split(",")) if item.split("=")[0] not in parse]
    if unknown:
        raise SystemExit(f"run {sampler!r}: unknown option {unknown[0]!r}; expected one of {', '.join(parse)}")
    options = {}
    for item in filter(None, opts.split(",")):
        key, value = item.split("=")
        options[key] = parse[key](value)
    return name, options


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


def sample_bundle(sampler: str, nfe: int, num: int, seed: int, batch: int, bundle: Path) -> np.ndarray:
    import torch

    from vpsde.export import export_bundle, load_model, steps_for_nfe
    from vpsde.export.bundle import default_std_formula
    from vpsde.models.sde import VPSDE
    from vpsde.runtime import Sampler

    torch.set_num_threads(1)
    sampler, options = split_options(sampler)
    precision = options.pop("precision", "fp32")
    sde = VPSDE(std_formula=default_std_formula(sampler, None))
    steps = steps_for_nfe(sampler, nfe, options.get("corrector_steps", 1))
    export_bundle(load_model("digits", sde), bundle, sampler=sampler, steps=steps, sde=sde, value_range=(-1, 1),
                  overwrite=True, log=lambda m: None, precision=precision, **options)
    backend = "openvino" if precision == "bf16" else "onnxruntime"  # ORT's CPU provider has no bfloat16 kernels
    return Sampler(bundle, backend=backend, progress=False, threads=1).sample(num, seed=seed, batch_size=batch)


def _child(sampler: str, nfe: int, num: int, seed: int, batch: int, out: str) -> None:
    t0 = time.perf_counter()
    if sampler == "eager-em":
        x = sample_eager(num, nfe, seed, batch)
    else:
        x = sample_bundle(sampler, nfe, num, seed, batch, Path(out).with_suffix(".bundle"))
    np.savez_compressed(out, samples=x, seconds=time.perf_counter() - t0)
    print(f"{run_name(sampler, nfe)}: {num} samples in {time.perf_counter() - t0:.0f} s", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=parse_run, help="SAMPLER:NFE[@NUM], e.g. eager-em:1000 dpmpp-2m:20")
    p.add_argument("--num", type=int, default=1000, help="samples per run (unless @NUM)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--jobs", type=int, default=1, help="runs sampled in parallel (one thread each)")
    p.add_argument("--resample", action="store_true", help="sample again even where OUT/<run>.npz exists")
    p.add_argument("--out", type=Path, default=Path("out/quality"))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    todo = [(s, n, num or args.num) for s, n, num in args.runs
            if args.resample or not (args.out / f"{run_name(s, n)}.npz").is_file()]
    ctx = mp.get_context("spawn")
    running: list = []
    for sampler, nfe, num in todo:
        while len(running) >= args.jobs:
            running.pop(0).join()
        print(f"sampling {run_name(sampler, nfe)} x {num}...", file=sys.stderr)
        proc = ctx.Process(target=_child, args=(sampler, nfe, num, args.seed, args.batch,
                                                str(args.out / f"{run_name(sampler, nfe)}.npz")))
        proc.start()
        running.append(proc)
    for proc in running:
        proc.join()
        if proc.exitcode:
            raise SystemExit(f"a sampling process failed with exit code {proc.exitcode}")

    from vpsde.models.digits_data import train_heldout_split
    from vpsde.models.digits_eval import DigitsYardstick
    from vpsde.runtime.images import image_grid, save_png

    yard = DigitsYardstick.fit()
    _, (x_ho, _) = train_heldout_split()
    n_ho = len(x_ho)
    results = {"classifier_heldout_accuracy": yard.heldout_accuracy, "heldout_real": yard.report(x_ho)}
    names = [run_name(s, n) for s, n, _ in args.runs]
    for name in names:
        with np.load(args.out / f"{name}.npz") as f:
            x, seconds = f["samples"], float(f["seconds"])
        results[name] = yard.report(x) | {"seconds": seconds, f"fd_to_train_first_{n_ho}": yard.frechet(x[:n_ho])}
        save_png(args.out / f"{name}_grid.png", image_grid(x[:100], (-1, 1)))
    (args.out / "quality.json").write_text(json.dumps(results, indent=2))
    print(f"classifier held-out accuracy {yard.heldout_accuracy:.3f}")
    print(f"| run | n | FD to train | ± boot SE | FD (first {n_ho}) | confidence | max class dev | seconds (1 thread) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    ho = results["heldout_real"]
    print(f"| held-out real | {ho['n']} | {ho['fd_to_train']:.2f} | {ho['fd_bootstrap_se']:.2f} | {ho['fd_to_train']:.2f} "
          f"| {ho['mean_confidence']:.3f} | {ho['class_balance_max_dev']:.3f} | |")
    for name in names:
        r = results[name]
        print(f"| {name} | {r['n']} | {r['fd_to_train']:.2f} | {r['fd_bootstrap_se']:.2f} | "
              f"{r[f'fd_to_train_first_{n_ho}']:.2f} | {r['mean_confidence']:.3f} | {r['class_balance_max_dev']:.3f} "
              f"| {r['seconds']:.0f} |")
    print(f"wrote {args.out}/quality.json and grids")


if __name__ == "__main__":
    main()
