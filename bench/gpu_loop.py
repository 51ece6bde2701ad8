"""GPU loop benchmark: the diffusers EM loop in eager torch and under torch.compile with CUDA graphs, beside the
vpsde device loop on ONNX Runtime's CUDA execution provider and on TensorRT (CUDA-graph replay off and on); same
model, steps and batches. Each loop runs in its own process, one warm-up run per batch, then the median of
--repeats. For every vpsde loop it also times N bare graph calls on bound buffers (no noise, no schedule uploads),
so the table shows the loop's overhead over the graph itself. The torch.compile loops draw the eager loop's noise
(same generator, same order), so their samples are compared with the eager one's (max |diff|).

    python bench/gpu_loop.py --steps 200 --batch 1,16,64 [--precision fp16] [--loops ...] [--json out.json]
    python bench/gpu_loop.py --device cpu --steps 4 --batch 1,2     # the harness on any machine

Needs torch with CUDA for the torch loops on a GPU, onnxruntime-gpu for the ORT loops, and a TensorRT that targets
the GPU plus cuda-python for the TensorRT loops (engines are built into the temporary bundle first). A loop that
cannot run here, or runs past --loop-timeout, is listed with the reason instead of a time.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import queue
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from vpsde.runtime.benchmark import bare_step_seconds, program_run

EAGER = "diffusers-eager"
# torch.compile of one whole EM step (network and update): "reduce-overhead" is inductor with CUDA graphs (on a
# CPU it skips the graphs), "cudagraphs" captures the eager kernels in CUDA graphs without code generation
COMPILED = {
    "torch-compile": dict(mode="reduce-overhead"),
    "torch-cudagraphs": dict(backend="cudagraphs"),
}
VPSDE_LOOPS = {
    "vpsde-ort-cpu": dict(device="cpu"),
    "vpsde-ort-cuda": dict(device="cuda"),
    "vpsde-ort-cuda-graph": dict(device="cuda", cuda_graph=True),
    "vpsde-ort-trt-ep": dict(backend="onnxruntime-trt"),
    "vpsde-trt": dict(backend="tensorrt"),
    "vpsde-trt-graph": dict(backend="tensorrt", cuda_graph=True),
}
DEFAULT_LOOPS = {
    "cuda": [EAGER, "vpsde-ort-cuda", "vpsde-ort-cuda-graph", "torch-cudagraphs", "torch-compile",
             "vpsde-ort-trt-ep", "vpsde-trt", "vpsde-trt-graph"],
    "cpu": [EAGER, "vpsde-ort-cpu", "torch-compile"],
}


def em_step(model, x, t, noise, *, dt: float, beta_min: float, beta_max: float, dtype):
    """One step of diffusers' ``ScoreSdeVpScheduler.step_pred`` on the model's eps, with the step's noise passed in
    (so torch.compile sees no generator). x, noise: [B, *sample_shape] float32; t: [B] float32; dt < 0.
    Returns (x_next, x_mean), float32."""
    eps = model(x.to(dtype), t).float()
    log_mean_coeff = -0.25 * t**2 * (beta_max - beta_min) - 0.5 * t * beta_min
    std = _per_row(x, torch.sqrt(1.0 - torch.exp(2.0 * log_mean_coeff)))
    score = -eps / std
    beta_t = _per_row(x, beta_min + t * (beta_max - beta_min))
    diffusion = torch.sqrt(beta_t)
    drift = -0.5 * beta_t * x - diffusion**2 * score
    x_mean = x + drift * dt
    return x_mean + diffusion * math.sqrt(-dt) * noise, x_mean


def _per_row(x, v):
    """[B] -> [B, 1, ...] broadcasting against x."""
    return v.reshape(-1, *[1] * (x.dim() - 1))


def torch_loop(kind: str, model, batch: int, steps: int, device: str):
    """A function that runs the whole EM loop once from seed 0 and returns the final x_mean [B, ...] (waited for)."""
    from diffusers.schedulers.deprecated.scheduling_sde_vp import ScoreSdeVpScheduler

    sched = ScoreSdeVpScheduler(num_train_timesteps=1000)
    sched.set_timesteps(steps)
    dtype = next(model.parameters()).dtype
    shape = (batch, *model.sample_shape)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    if kind == EAGER:
        def run():
            g = torch.Generator(device=device).manual_seed(0)
            x = torch.randn(shape, generator=g, device=device)
            with torch.inference_mode():
                for t in sched.timesteps:
                    tv = t.repeat(batch).to(device)
                    eps = model(x.to(dtype), tv).float()
                    x, x_mean = sched.step_pred(eps, x, tv, generator=g)
            sync()
            return x_mean
        return run

    import functools

    cfg = sched.config
    step = torch.compile(functools.partial(em_step, model, dt=-1.0 / steps, beta_min=cfg.beta_min,
                                           beta_max=cfg.beta_max, dtype=dtype),
                         fullgraph=True, dynamic=False, **COMPILED[kind])
    t_rows = [t.repeat(batch).to(device) for t in sched.timesteps]

    def run():
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(shape, generator=g, device=device)
        with torch.no_grad():
            for tv in t_rows:
                noise = torch.randn(shape, generator=g, device=device)
                torch.compiler.cudagraph_mark_step_begin()
                x_next, x_mean = step(x, tv, noise)
                x = x_next.clone()  # a graph's outputs are overwritten by its next replay
            x_mean = x_mean.clone()
        sync()
        return x_mean
    return run


def worker(kind: str, args: dict, bundle: str, out) -> None:
    """Times ``kind`` at every batch; puts one message per batch, then {"done": True}."""
    import numpy as np

    try:
        if kind in VPSDE_LOOPS:
            from vpsde.runtime import Sampler

            sampler = Sampler(bundle, progress=False, **VPSDE_LOOPS[kind])
        else:
            from vpsde.export import VPSDE, load_model

            model = load_model(args["model"], VPSDE(std_formula="diffusers")).to(args["device"])
            if args["precision"] == "fp16":
                model = model.half()
            if args["device"] == "cuda":
                out.put({"gpu": torch.cuda.get_device_name()})
        for batch in args["batches"]:
            t_start = time.perf_counter()
            if kind in VPSDE_LOOPS:
                run = program_run(sampler, batch, args["steps"])
            else:
                run = torch_loop(kind, model, batch, args["steps"], args["device"])
            sample = run()  # warm-up: session buffers, CUDA-graph capture, compilation
            warm_s = time.perf_counter() - t_start
            times = []
            for _ in range(args["repeats"]):
                t0 = time.perf_counter()
                run()
                times.append(time.perf_counter() - t0)
            msg = {"batch": batch, "times": times, "warmup_s": warm_s}
            if kind in VPSDE_LOOPS:
                msg["bare_s"] = bare_step_seconds(sampler, batch, args["steps"])
            else:
                msg["sample"] = np.asarray(sample.float().cpu())
            out.put(msg)
    except Exception as e:  # a loop that cannot run here is reported, not timed
        out.put({"error": f"{type(e).__name__}: {e}".splitlines()[0]})
    out.put({"done": True})


def collect(kind: str, args: argparse.Namespace, bundle: Path) -> dict:
    """Runs ``kind``'s worker in a fresh process; returns {"batches": {b: result}, "error"?, "gpu"?}."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=worker, args=(kind, {**vars(args), "batches": args.batch}, str(bundle), q))
    proc.start()
    result: dict = {"batches": {}}
    deadline = time.monotonic() + args.loop_timeout
    while True:
        try:
            msg = q.get(timeout=max(1.0, deadline - time.monotonic()))
        except queue.Empty:
            result["error"] = f"ran past --loop-timeout {args.loop_timeout:g} s"
            proc.terminate()
            break
        if msg.get("done"):
            break
        if "batch" in msg:
            batch = msg.pop("batch")
            result["batches"][batch] = msg
            print(f"  {kind} batch {batch}: median {statistics.median(msg['times']):.3f} s/run", file=sys.stderr,
                  flush=True)
        else:
            result.update(msg)
    proc.join(timeout=30)
    return result


def summarize(results: dict, args: argparse.Namespace) -> dict:
    """Per loop and batch: median seconds, ms/step, samples/s, loop overhead over bare calls, speed-up over the
    eager loop, and for the torch loops the max |diff| of the sample from the eager loop's."""
    eager = results.get(EAGER, {}).get("batches", {})
    table: dict = {}
    for kind, r in results.items():
        rows = {}
        for batch, m in r["batches"].items():
            med = statistics.median(m["times"])
            row = {"median_s": med, "ms_per_step": 1e3 * med / args.steps, "samples_per_s": batch / med,
                   "times_s": m["times"], "warmup_s": m["warmup_s"]}
            if "bare_s" in m:
                row |= {"bare_ms_per_step": 1e3 * m["bare_s"] / args.steps, "loop_overhead": med / m["bare_s"]}
            if batch in eager:
                row["vs_eager"] = statistics.median(eager[batch]["times"]) / med
                if "sample" in m and kind != EAGER:
                    diff = abs(m["sample"] - eager[batch]["sample"]).max()
                    row["max_abs_diff_vs_eager"] = float(diff)  # NaN stays NaN, so it reads as a failure
            rows[batch] = row
        table[kind] = {"batches": rows, **({"error": r["error"]} if "error" in r else {})}
    return table


def print_table(table: dict, args: argparse.Namespace, gpu: str | None) -> None:
    print(f"\n{args.model}, {args.steps} EM steps, {args.precision}, {gpu or args.device}, median of {args.repeats}")
    print(f"{'loop':<22}{'batch':>6}{'s/run':>9}{'ms/step':>9}{'samples/s':>11}{'bare ms/step':>14}"
          f"{'overhead':>10}{'vs eager':>10}{'|diff| eager':>14}")
    for kind, t in table.items():
        for batch, row in t["batches"].items():
            bare = (f"{row['bare_ms_per_step']:>14.3f}{row['loop_overhead']:>9.3f}x" if "loop_overhead" in row
                    else " " * 24)
            speed = f"{row['vs_eager']:>9.2f}x" if "vs_eager" in row else " " * 10
            diff = f"{row['max_abs_diff_vs_eager']:>14.2e}" if "max_abs_diff_vs_eager" in row else ""
            print(f"{kind:<22}{batch:>6}{row['median_s']:>9.3f}{row['ms_per_step']:>9.3f}{row['samples_per_s']:>11.1f}"
                  f"{bare}{speed}{diff}")
        if "error" in t:
            print(f"{kind:<22}  not run: {t['error']}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="digits",
                   help="model spec (e.g. score_sde-random:config=cifar10_ddpmpp_continuous for DDPM++ at CIFAR scale)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=lambda s: [int(b) for b in s.split(",")], default=[64],
                   help="batch sizes, comma-separated (default 64)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16"])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="device of the torch loops")
    p.add_argument("--loops", nargs="+", choices=[EAGER, *COMPILED, *VPSDE_LOOPS],
                   help="default: every loop for --device, the eager one first")
    p.add_argument("--loop-timeout", type=float, default=300, help="seconds one loop may take over all batches")
    p.add_argument("--json", type=Path, help="write the table here too (rewritten after every loop)")
    args = p.parse_args(argv)
    loops = args.loops or DEFAULT_LOOPS[args.device]

    from vpsde.export import VPSDE, export_bundle, load_model

    bundle = Path(tempfile.mkdtemp(prefix="vpsde-gpu-")) / "bundle"
    export_bundle(load_model(args.model, VPSDE(std_formula="diffusers")), bundle, steps=args.steps, grid="diffusers",
                  precision=args.precision, log=lambda m: print(m, file=sys.stderr))
    if any(k.startswith("vpsde-trt") for k in loops):
        build_engines(bundle, args.batch)
    results, gpu = {}, None
    for kind in loops:
        print(f"{kind} ...", file=sys.stderr, flush=True)
        results[kind] = collect(kind, args, bundle)
        gpu = results[kind].pop("gpu", gpu)
        if args.json:
            doc = {"model": args.model, "steps": args.steps, "precision": args.precision, "device": args.device,
                   "gpu": gpu, "repeats": args.repeats, "loops": summarize(results, args)}
            args.json.write_text(json.dumps(doc, indent=1))
    print_table(summarize(results, args), args, gpu)


def build_engines(bundle: Path, batches: list[int]) -> None:
    """Engines for this GPU into the bundle's cache (skipped with a note when TensorRT or a GPU is missing)."""
    from vpsde.runtime import Bundle
    from vpsde.runtime.errors import VpsdeError
    from vpsde.runtime.tensorrt.build import BatchProfile
    from vpsde.runtime.tensorrt.cache import build_cached
    from vpsde.runtime.tensorrt.cuda import gpu_info
    from vpsde.runtime.tensorrt.flavor import load_flavor

    try:
        flavor, b = load_flavor("auto"), Bundle.load(bundle)
        profile = BatchProfile(min(batches), max(batches), max(batches))
        for graph in b.manifest.graphs:
            build_cached(b, graph, flavor, profile, [gpu_info().compute_capability])
    except VpsdeError as e:
        print(f"no TensorRT engines: {e}", file=sys.stderr)


if __name__ == "__main__":
    main()
