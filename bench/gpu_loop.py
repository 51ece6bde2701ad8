"""GPU loop benchmark: the diffusers eager loop on torch CUDA vs the vpsde device loop on ONNX Runtime's CUDA
execution provider and on TensorRT, each with and without CUDA-graph replay; same model (shipped digits), steps
and batch; each loop in its own process, one warm-up run, then the median of --repeats. For every vpsde loop it
also times N bare graph calls on bound buffers (no noise, no schedule uploads), so the table shows the loop's
overhead over the graph itself.

    python bench/gpu_loop.py --steps 200 --batch 64 [--precision fp16] [--loops ...]

Needs torch with CUDA (for the eager loop), onnxruntime-gpu for the ORT loops, and a TensorRT that targets the
GPU plus cuda-python for the TensorRT loops (engines are built into the temporary bundle first). A loop that
cannot run here is listed with the reason instead of a time.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path

from vpsde.runtime.benchmark import bare_step_seconds


def worker(kind: str, args: dict, bundle: str, queue) -> None:
    if kind == "diffusers-eager-cuda":
        import torch
        from diffusers.schedulers.deprecated.scheduling_sde_vp import ScoreSdeVpScheduler

        from vpsde.export import VPSDE, load_model

        model = load_model(args["model"], VPSDE(std_formula="diffusers")).cuda()
        if args["precision"] == "fp16":
            model = model.half()

        def run():
            sched = ScoreSdeVpScheduler(num_train_timesteps=1000)
            sched.set_timesteps(args["steps"])
            g = torch.Generator(device="cuda").manual_seed(0)
            x = torch.randn((args["batch"], *model.sample_shape), generator=g, device="cuda")
            with torch.inference_mode():
                for t in sched.timesteps:
                    tv = t.repeat(args["batch"]).cuda()
                    eps = model(x.to(next(model.parameters()).dtype), tv).float()
                    x, x_mean = sched.step_pred(eps, x, tv, generator=g)
            torch.cuda.synchronize()
            return x_mean
    else:
        from vpsde.runtime import Sampler

        try:
            sampler = Sampler(bundle, progress=False, **LOOPS[kind])
            run = lambda: sampler.sample(args["batch"], seed=0)  # noqa: E731
            run()
        except Exception as e:  # a loop that cannot run here is reported, not timed
            queue.put({"kind": kind, "error": f"{type(e).__name__}: {e}".splitlines()[0]})
            return
    run()
    times = []
    for _ in range(args["repeats"]):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    result = {"kind": kind, "times": times}
    if kind != "diffusers-eager-cuda":
        result["bare_s"] = bare_step_seconds(sampler, args["batch"], args["steps"])
    queue.put(result)


LOOPS = {
    "vpsde-ort-cpu": dict(device="cpu"),  # the harness on any machine (not in the default set)
    "vpsde-ort-cuda": dict(device="cuda"),
    "vpsde-ort-cuda-graph": dict(device="cuda", cuda_graph=True),
    "vpsde-ort-trt-ep": dict(backend="onnxruntime-trt"),
    "vpsde-trt": dict(backend="tensorrt"),
    "vpsde-trt-graph": dict(backend="tensorrt", cuda_graph=True),
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="digits",
                   help="model spec (e.g. score_sde-random:config=cifar10_ddpmpp_continuous for DDPM++ at CIFAR scale)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16"])
    p.add_argument("--loops", nargs="+", default=["diffusers-eager-cuda", *list(LOOPS)[1:]],
                   choices=["diffusers-eager-cuda", *LOOPS])
    args = p.parse_args(argv)

    from vpsde.export import VPSDE, export_bundle, load_model

    bundle = Path(tempfile.mkdtemp(prefix="vpsde-gpu-")) / "bundle"
    export_bundle(load_model(args.model, VPSDE(std_formula="diffusers")), bundle, steps=args.steps, grid="diffusers",
                  precision=args.precision, log=lambda m: print(m, file=sys.stderr))
    if any(k.startswith("vpsde-trt") for k in args.loops):
        build_engines(bundle, args.batch)
    ctx = mp.get_context("spawn")
    results = {}
    for kind in args.loops:
        q = ctx.Queue()
        proc = ctx.Process(target=worker, args=(kind, vars(args), str(bundle), q))
        proc.start()
        results[kind] = q.get()
        proc.join()
    print(f"\n{args.model}, {args.steps} EM steps, batch {args.batch}, {args.precision}, median of {args.repeats}")
    print(f"{'loop':<24}{'s/run':>9}{'ms/step':>9}{'samples/s':>11}{'bare ms/call':>14}{'loop overhead':>15}"
          f"{'vs eager':>10}")
    eager = results.get("diffusers-eager-cuda", {}).get("times")
    for kind, r in results.items():
        if "error" in r:
            print(f"{kind:<24}  not run: {r['error']}")
            continue
        med = statistics.median(r["times"])
        bare = f"{1e3 * r['bare_s'] / args.steps:>14.3f}{med / r['bare_s']:>14.2f}x" if "bare_s" in r else " " * 29
        speed = f"{statistics.median(eager) / med:>9.2f}x" if eager else ""
        print(f"{kind:<24}{med:>9.3f}{1e3 * med / args.steps:>9.3f}{args.batch / med:>11.1f}{bare}{speed}")


def build_engines(bundle: Path, batch: int) -> None:
    """Engines for this GPU into the bundle's cache (skipped with a note when TensorRT or a GPU is missing)."""
    from vpsde.runtime import Bundle
    from vpsde.runtime.errors import VpsdeError
    from vpsde.runtime.tensorrt.build import BatchProfile
    from vpsde.runtime.tensorrt.cache import build_cached
    from vpsde.runtime.tensorrt.cuda import gpu_info
    from vpsde.runtime.tensorrt.flavor import load_flavor

    try:
        flavor, b = load_flavor("auto"), Bundle.load(bundle)
        for graph in b.manifest.graphs:
            build_cached(b, graph, flavor, BatchProfile(batch, batch, batch), [gpu_info().compute_capability])
    except VpsdeError as e:
        print(f"no TensorRT engines: {e}", file=sys.stderr)


if __name__ == "__main__":
    main()
