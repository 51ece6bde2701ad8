"""CPU loops side by side, interleaved: vpsde's ONNX Runtime loop (fp32, int8; noise drawn three ways), N bare calls
of the same step graph (the loop's limit), a plain ONNX Runtime loop over the bare network with the scheduler in
numpy, and diffusers' loop in eager torch and under torch.compile.

Each contender lives in its own long-lived process (so its peak RSS is its own, and its session stays warm).
Every round runs each contender once, in an order rotated from round to round, so that load drifting on a shared
machine hits all of them alike; the report gives, per contender, the median time and the median of its per-round
ratio to ``vpsde-ort`` (vpsde's default), which is what to read on a busy machine.

    vpsde-ort                 the default Sampler: noise drawn in line, many calls per pass (CPU)
    vpsde-ort-int8            the same on an int8 bundle (export --precision int8, export/quantize.py)
    vpsde-openvino-bf16       the default Sampler on a bf16 bundle (export --precision bf16) on the openvino backend
                              (vpsde[openvino]; ONNX Runtime's CPU provider has no bfloat16 kernels)
    vpsde-ort-all-threads     vpsde-ort with the Sampler's default intra-op threads (all cores) instead of --threads
    vpsde-ort-inline-noise    noise drawn in line, one call at a time
    vpsde-ort-prefetch        noise drawn one call ahead on a worker thread
    vpsde-bare                N bare calls of the step graph: the calls of one vpsde-ort trajectory, each call's
                              inputs staged beforehand and bound once (no noise, no uploads; ReplayedCalls)
    plain-ort-unet            the network alone exported by torch.onnx.export (dynamo, its default optimizer), one
                              session.run per step, diffusers' step_pred in numpy, numpy noise: what a user
                              writes by hand
    diffusers-eager           diffusers' ScoreSdeVpScheduler loop around the torch model, torch noise
    diffusers-compile         the same loop around torch.compile(model) (inductor; compiled in the warm-up run)
    openvino-f32, openvino    the fused step graph (the same lean fp32 em.onnx) on OpenVINO's CPU plugin, one
                              infer() per step, schedule from the manifest, numpy noise; with its inference
                              precision pinned to f32, and its default (bf16 where the CPU has AMX/AVX512-BF16,
                              which changes the numerics of a graph that declares fp32)

    python bench/cpu_loop.py                                     # shipped digits model, 100 steps, batch 1, 16, 64
    python bench/cpu_loop.py --model unet-random --steps 50 --batch 16 --threads 2 --rounds 7
    python bench/cpu_loop.py --model score_sde-random --steps 3 --batch 1 16 64 --rounds 3   # DDPM++ at CIFAR scale
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

CONTENDERS = ("vpsde-ort", "vpsde-ort-int8", "vpsde-openvino-bf16", "vpsde-ort-all-threads", "vpsde-ort-inline-noise", "vpsde-ort-prefetch",
              "vpsde-bare", "plain-ort-unet", "diffusers-eager", "diffusers-compile", "openvino-f32", "openvino")
BUNDLE_PRECISION = {"vpsde-ort-int8": "int8", "vpsde-openvino-bf16": "bf16"}
"""Contenders that sample a bundle of another precision (exported beside the fp32 one, as bundle-<precision>)."""
DEFAULT_LOOPS = ("vpsde-ort", "vpsde-ort-int8", "vpsde-bare", "plain-ort-unet", "diffusers-eager", "diffusers-compile")


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


def _export_bare_network(model, path: Path) -> None:
    """The network alone, ``(x [B, *S], t [B]) -> eps``, as a user exports it: torch.onnx.export (dynamo) with its
    default optimizer, symbolic batch."""
    import torch

    x = torch.randn((2, *model.sample_shape))
    t = torch.rand(2)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    with torch.no_grad():
        torch.onnx.export(model, (x, t), str(path), input_names=["x", "t"], output_names=["eps"], dynamo=True,
                          dynamic_shapes={"x": {0: batch}, "t": {0: batch}}, verbose=False)


def _plain_ort_loop(session, sample_shape, num, steps, seed, beta_min=0.1, beta_max=20.0, eps=1e-3):
    """diffusers' ``ScoreSdeVpScheduler.step_pred`` written in numpy around one ``session.run`` per step."""
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num, *sample_shape), dtype=np.float32)
    dt = -1.0 / steps
    for t in np.linspace(1.0, eps, steps):
        log_mean_coeff = -0.25 * t**2 * (beta_max - beta_min) - 0.5 * t * beta_min
        std = np.sqrt(1.0 - np.exp(2.0 * log_mean_coeff))
        eps_pred = session.run(None, {"x": x, "t": np.full(num, t, np.float32)})[0]
        beta_t = beta_min + t * (beta_max - beta_min)
        drift = np.float32(-0.5 * beta_t) * x + np.float32(beta_t / std) * eps_pred  # -0.5 beta x - beta score
        x_mean = x + drift * np.float32(dt)
        x = x_mean + np.float32(np.sqrt(beta_t) * np.sqrt(-dt)) * rng.standard_normal(x.shape, dtype=np.float32)
    return x_mean


def _openvino_loop(request, manifest, num, seed):
    """The bundle's EM program on an OpenVINO infer request: x_next fed back, numpy noise."""
    import numpy as np

    rng = np.random.default_rng(seed)
    shape = (num, *manifest.model.sample_shape)
    x = rng.standard_normal(shape, dtype=np.float32)
    for i in range(manifest.sampler.steps):
        feed = {name: np.full(num, values[i], np.float32) for name, values in manifest.schedule.items()}
        out = request.infer(feed | {"x": x, "noise": rng.standard_normal(shape, dtype=np.float32)})
        x, x_mean = out["x_next"], out["x_mean"]
    return x_mean


def worker(kind: str, args: dict, bundle: str, conn) -> None:
    """Child: build the loop once, warm it up, then time one run per "run <batch>" message; "stop" -> peak RSS."""
    if kind.startswith("diffusers-"):
        import torch

        from vpsde.export import VPSDE, load_model

        torch.set_num_threads(args["threads"])
        model = load_model(args["model"], VPSDE(std_formula="diffusers"))
        if kind == "diffusers-compile":
            model = torch.compile(model)
        make = lambda batch: (lambda: _diffusers_loop(model, batch, args["steps"], 0))  # noqa: E731
    elif kind == "plain-ort-unet":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = args["threads"]
        session = ort.InferenceSession(str(Path(bundle).parent / "network.onnx"), options,
                                       providers=["CPUExecutionProvider"])
        shape = tuple(session.get_inputs()[0].shape[1:])
        make = lambda batch: (lambda: _plain_ort_loop(session, shape, batch, args["steps"], 0))  # noqa: E731
    elif kind.startswith("openvino"):
        import openvino as ov

        from vpsde.runtime import Bundle

        b = Bundle.load(bundle)
        config = {"INFERENCE_NUM_THREADS": args["threads"], "PERFORMANCE_HINT": "LATENCY"}
        if kind == "openvino-f32":
            config["INFERENCE_PRECISION_HINT"] = "f32"
        core = ov.Core()
        request = core.compile_model(core.read_model(str(b.graph_path("em"))), "CPU", config).create_infer_request()
        make = lambda batch: (lambda: _openvino_loop(request, b.manifest, batch, 0))  # noqa: E731
    else:
        from vpsde.runtime import Sampler  # no torch in this process: its RSS is the runtime's own
        from vpsde.runtime.benchmark import ReplayedCalls

        if kind in BUNDLE_PRECISION:
            bundle = str(Path(bundle).parent / f"bundle-{BUNDLE_PRECISION[kind]}")
        threads = None if kind == "vpsde-ort-all-threads" else args["threads"]
        sampler = Sampler(bundle, backend="openvino" if "openvino" in kind else "onnxruntime", progress=False,
                          threads=threads, prefetch_noise=kind == "vpsde-ort-prefetch",
                          noise_chunk=1 if kind == "vpsde-ort-inline-noise" else None)
        if kind == "vpsde-bare":
            make = lambda batch: ReplayedCalls(sampler, batch, args["steps"]).seconds  # noqa: E731
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
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads for both torch and ORT")
    p.add_argument("--base", default="vpsde-ort", choices=CONTENDERS, help="the contender ratios are taken to")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--loops", nargs="+", default=list(DEFAULT_LOOPS), choices=CONTENDERS)
    args = p.parse_args(argv)

    from vpsde.export import VPSDE, export_bundle, load_model

    tmp = tempfile.mkdtemp(prefix="vpsde-bench-")
    bundle = Path(tmp) / "bundle"
    model = load_model(args.model, VPSDE(std_formula="diffusers"))
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    export_bundle(model, bundle, steps=args.steps, grid="diffusers", log=log)
    for kind, precision in BUNDLE_PRECISION.items():
        if kind in args.loops:
            export_bundle(model, Path(tmp) / f"bundle-{precision}", steps=args.steps, grid="diffusers",
                          precision=precision, log=log)
    if "plain-ort-unet" in args.loops:
        _export_bare_network(model, Path(tmp) / "network.onnx")
    del model
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

    base = args.base if args.base in args.loops else args.loops[0]
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
