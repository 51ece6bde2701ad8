"""CPU loops side by side, interleaved: the diffusers eager loop (torch) and the vpsde ONNX Runtime loop with its
noise drawn three ways, against N bare calls of the same step graph (the loop's limit).

Each contender lives in its own long-lived process (so its peak RSS is its own, and its session stays warm).
Every round runs each contender once, in an order rotated from round to round, so that load drifting on a shared
machine hits all of them alike; the report gives, per contender, the median time and the median of its per-round
ratio to ``vpsde-ort`` (vpsde's default), which is what to read on a busy machine.

    vpsde-ort                 the default Sampler: noise drawn in line, many calls per pass (CPU)
    vpsde-ort-inline-noise    noise drawn in line, one call at a time
    vpsde-ort-prefetch        noise drawn one call ahead on a worker thread
    vpsde-bare                N bare calls of the step graph on buffers bound once (no noise, no uploads)
    diffusers-eager           diffusers' ScoreSdeVpScheduler loop around the torch model, torch noise

    python bench/cpu_loop.py                                     # shipped digits model, 200 steps, batch 1 and 64
    python bench/cpu_loop.py --model unet-random --steps 100 --batch 16 --threads 2 --rounds 7
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

CONTENDERS = ("vpsde-ort", "vpsde-ort-inline-noise", "vpsde-ort-prefetch", "vpsde-bare", "diffusers-eager")


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


def worker(kind: str, args: dict, bundle: str, conn) -> None:
    """Child: build the loop once, warm it up, then time one run per "run <batch>" message; "stop" -> peak RSS."""
    if kind == "diffusers-eager":
        import torch

        from vpsde.export import VPSDE, load_model

        torch.set_num_threads(args["threads"])
        model = load_model(args["model"], VPSDE(std_formula="diffusers"))
        make = lambda batch: (lambda: _diffusers_loop(model, batch, args["steps"], 0))  # noqa: E731
    else:
        from vpsde.runtime import Sampler  # no torch in this process: its RSS is the runtime's own
        from vpsde.runtime.benchmark import bare_step_seconds

        sampler = Sampler(bundle, progress=False, threads=args["threads"], prefetch_noise=kind == "vpsde-ort-prefetch",
                          noise_chunk=1 if kind == "vpsde-ort-inline-noise" else None)
        if kind == "vpsde-bare":
            make = lambda batch: (lambda: bare_step_seconds(sampler, batch, args["steps"]))  # noqa: E731
        else:
            make = lambda batch: (lambda: sampler.sample(batch, seed=0))  # noqa: E731
    from vpsde.runtime.benchmark import peak_rss_mb

    runs = {}
    while True:
        msg = conn.recv()
        if msg == "stop":
            conn.send(peak_rss_mb())
            return
        batch = int(msg)
        if batch not in runs:
            runs[batch] = make(batch)
            runs[batch]()  # warm-up
        t0 = time.perf_counter()
        runs[batch]()
        conn.send(time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="digits")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads for both torch and ORT")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--loops", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    args = p.parse_args(argv)

    from vpsde.export import VPSDE, export_bundle, load_model

    tmp = tempfile.mkdtemp(prefix="vpsde-bench-")
    bundle = Path(tmp) / "bundle"
    export_bundle(load_model(args.model, VPSDE(std_formula="diffusers")), bundle, steps=args.steps, grid="diffusers",
                  log=lambda m: print(m, file=sys.stderr))
    ctx = mp.get_context("spawn")
    conns, procs = {}, []
    for kind in args.loops:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=worker, args=(kind, vars(args) | {"json": None}, str(bundle), child))
        proc.start()
        conns[kind], procs = parent, procs + [proc]
    times = {(k, b): [] for k in args.loops for b in args.batch}
    for r in range(args.rounds):
        for batch in args.batch:
            order = args.loops[r % len(args.loops):] + args.loops[:r % len(args.loops)]
            for kind in order:
                conns[kind].send(str(batch))
                times[kind, batch].append(conns[kind].recv())
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    rss = {}
    for kind in args.loops:
        conns[kind].send("stop")
        rss[kind] = conns[kind].recv()
    for proc in procs:
        proc.join()

    import onnxruntime
    import torch

    base = "vpsde-ort" if "vpsde-ort" in args.loops else args.loops[0]
    print(f"\nVP-SDE Euler-Maruyama, model {args.model}, {args.steps} steps, {args.threads} thread(s), {args.rounds} "
          f"interleaved rounds (torch {torch.__version__}, onnxruntime {onnxruntime.__version__})")
    print(f"{'loop':<24}{'batch':>6}{'median s':>10}{'ms/step':>10}{'samples/s':>11}{'x ' + base:>16}"
          f"{'peak RSS MB':>13}")
    results = []
    for batch in args.batch:
        for kind in args.loops:
            t = times[kind, batch]
            ratio = statistics.median(a / b for a, b in zip(t, times[base, batch]))
            med = statistics.median(t)
            row = {"loop": kind, "batch": batch, "median_s": med, "ms_per_step": 1e3 * med / args.steps,
                   "samples_per_s": batch / med, "ratio_to_" + base: ratio, "peak_rss_mb": rss[kind], "times": t}
            results.append(row)
            print(f"{kind:<24}{batch:>6}{med:>10.3f}{row['ms_per_step']:>10.3f}{row['samples_per_s']:>11.2f}"
                  f"{ratio:>16.3f}{rss[kind]:>13.0f}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                        indent=2))


if __name__ == "__main__":
    main()
