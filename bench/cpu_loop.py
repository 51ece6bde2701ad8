"""CPU baseline: the diffusers eager loop (torch) vs the vpsde ONNX Runtime loop, same model, steps and batch;
and the vpsde loop with its host noise drawn in line (before each call) vs prefetched on a worker thread.

Each loop runs in its own child process (so peak RSS is its own), warm-up first, then --repeats timed runs;
medians are reported, with the ratios. Whole-loop time includes host noise. For the vpsde loops, "loop
overhead" is the loop's time over that of N bare graph calls on buffers bound once (vpsde.runtime.benchmark.bare_step_seconds).

    python bench/cpu_loop.py                          # shipped digits model, 1000 steps, batch 16
    python bench/cpu_loop.py --model unet-random --steps 200 --batch 64 --threads 2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path

from vpsde.runtime.benchmark import bare_step_seconds, peak_rss_mb


def _diffusers_loop(model, num, steps, seed):
    import torch
    from diffusers.schedulers.deprecated.scheduling_sde_vp import ScoreSdeVpScheduler

    sched = ScoreSdeVpScheduler(num_train_timesteps=1000)
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((num, *model.sample_shape), generator=g)
    with torch.inference_mode():
        for t in sched.timesteps:
            t_vec = t.repeat(num)
            x, x_mean = sched.step_pred(model(x, t_vec), x, t_vec, generator=g)
    return x_mean


def worker(kind: str, args: dict, bundle: str, queue) -> None:
    """Child: build the loop, warm up, time ``repeats`` runs; report times and peak RSS."""
    if kind == "diffusers-eager":
        import torch

        from vpsde.export import VPSDE, load_model

        torch.set_num_threads(args["threads"])

        model = load_model(args["model"], VPSDE(std_formula="diffusers"))
        run = lambda: _diffusers_loop(model, args["batch"], args["steps"], 0)  # noqa: E731
    else:
        from vpsde.runtime import Sampler  # no torch in this process: its RSS is the runtime's own

        sampler = Sampler(bundle, progress=False, threads=args["threads"], prefetch_noise=kind == "vpsde-ort")
        run = lambda: sampler.sample(args["batch"], seed=0)  # noqa: E731
    run()  # warm-up
    times = []
    for _ in range(args["repeats"]):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    result = {"kind": kind, "times": times, "peak_rss_mb": peak_rss_mb()}
    if kind != "diffusers-eager":
        result["bare_s"] = statistics.median(bare_step_seconds(sampler, args["batch"], args["steps"]) for _ in range(args["repeats"]))
    queue.put(result)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="digits")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="intra-op threads for both torch and ORT")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--loops", nargs="+", default=["diffusers-eager", "vpsde-ort-inline-noise", "vpsde-ort"],
                   choices=["diffusers-eager", "vpsde-ort-inline-noise", "vpsde-ort"])
    args = p.parse_args(argv)

    from vpsde.export import VPSDE, export_bundle, load_model

    tmp = tempfile.mkdtemp(prefix="vpsde-bench-")
    bundle = Path(tmp) / "bundle"
    export_bundle(load_model(args.model, VPSDE(std_formula="diffusers")), bundle, steps=args.steps, grid="diffusers",
                  log=lambda m: print(m, file=sys.stderr))
    ctx = mp.get_context("spawn")
    results: dict[str, dict] = {}
    for kind in args.loops:
        q = ctx.Queue()
        proc = ctx.Process(target=worker, args=(kind, vars(args) | {"json": None}, str(bundle), q))
        proc.start()
        results[kind] = q.get()
        proc.join()

    import onnxruntime
    import torch

    print(f"\nVP-SDE Euler-Maruyama, model {args.model}, {args.steps} steps, batch {args.batch}, "
          f"{args.threads} threads, median of {args.repeats} (torch {torch.__version__}, onnxruntime {onnxruntime.__version__})")
    print(f"{'loop':<24}{'s/run':>10}{'ms/step':>10}{'samples/s':>12}{'peak RSS MB':>13}{'bare ms/call':>14}"
          f"{'loop overhead':>15}")
    for kind, r in results.items():
        med = statistics.median(r["times"])
        r |= {"median_s": med, "ms_per_step": 1e3 * med / args.steps, "samples_per_s": args.batch / med}
        bare = f"{1e3 * r['bare_s'] / args.steps:>14.3f}{med / r['bare_s']:>14.3f}x" if "bare_s" in r else ""
        print(f"{kind:<24}{med:>10.3f}{r['ms_per_step']:>10.3f}{r['samples_per_s']:>12.2f}{r['peak_rss_mb']:>13.0f}{bare}")
    ratio = None
    for base in ("diffusers-eager", "vpsde-ort-inline-noise"):
        if base in results and "vpsde-ort" in results:
            r = results[base]["median_s"] / results["vpsde-ort"]["median_s"]
            ratio = ratio or r
            print(f"speed-up of vpsde-ort (prefetched noise) over {base}: {r:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results,
                                         "speedup": ratio}, indent=2))


if __name__ == "__main__":
    main()
