"""GPU loop benchmark: the diffusers eager loop on torch CUDA vs the vpsde loop on ONNX Runtime's CUDA execution
provider, same model (shipped digits), steps and batch; each in its own process, warm-up, then medians.

    python bench/gpu_loop.py --steps 200 --batch 64 [--precision fp16]

Needs torch with CUDA (for the eager loop) and onnxruntime-gpu. TensorRT engines are not timed here yet.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path


def worker(kind: str, args: dict, bundle: str, queue) -> None:
    if kind == "diffusers-eager-cuda":
        import torch
        from diffusers.schedulers.deprecated.scheduling_sde_vp import ScoreSdeVpScheduler

        from vpsde.export import VPSDE, load_model

        model = load_model("digits", VPSDE(std_formula="diffusers")).cuda()
        if args["precision"] == "fp16":
            model = model.half()

        def run():
            sched = ScoreSdeVpScheduler(num_train_timesteps=1000)
            sched.set_timesteps(args["steps"])
            g = torch.Generator(device="cuda").manual_seed(0)
            x = torch.randn((args["batch"], 1, 16, 16), generator=g, device="cuda")
            with torch.inference_mode():
                for t in sched.timesteps:
                    tv = t.repeat(args["batch"]).cuda()
                    eps = model(x.to(next(model.parameters()).dtype), tv).float()
                    x, x_mean = sched.step_pred(eps, x, tv, generator=g)
            torch.cuda.synchronize()
            return x_mean
    else:
        from vpsde.runtime import Sampler

        sampler = Sampler(bundle, progress=False, device="cuda")
        run = lambda: sampler.sample(args["batch"], seed=0)  # noqa: E731
    run()
    times = []
    for _ in range(args["repeats"]):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    queue.put({"kind": kind, "times": times})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16"])
    args = p.parse_args(argv)

    from vpsde.export import VPSDE, export_bundle, load_model

    bundle = Path(tempfile.mkdtemp(prefix="vpsde-gpu-")) / "bundle"
    export_bundle(load_model("digits", VPSDE(std_formula="diffusers")), bundle, steps=args.steps, grid="diffusers",
                  precision=args.precision, log=lambda m: print(m, file=sys.stderr))
    ctx = mp.get_context("spawn")
    results = {}
    for kind in ("diffusers-eager-cuda", "vpsde-ort-cuda"):
        q = ctx.Queue()
        proc = ctx.Process(target=worker, args=(kind, vars(args), str(bundle), q))
        proc.start()
        results[kind] = q.get()
        proc.join()
    print(f"\ndigits, {args.steps} EM steps, batch {args.batch}, {args.precision}, median of {args.repeats}")
    print(f"{'loop':<22}{'s/run':>10}{'ms/step':>10}{'samples/s':>12}")
    for kind, r in results.items():
        med = statistics.median(r["times"])
        r["median_s"] = med
        print(f"{kind:<22}{med:>10.3f}{1e3 * med / args.steps:>10.3f}{args.batch / med:>12.1f}")
    print(f"speed-up of vpsde-ort-cuda over diffusers-eager-cuda: "
          f"{results['diffusers-eager-cuda']['median_s'] / results['vpsde-ort-cuda']['median_s']:.2f}x")


if __name__ == "__main__":
    main()
