"""score_sde's DDPM++ (cifar10 continuous config, 61.8 M parameters, random weights) at CIFAR scale: export time
and graph size per sampler and precision, ONNX-vs-eager parity on a batch the graph was not traced with, ms/step
of the eager diffusers-style loop vs vpsde on ONNX Runtime at batch 1 and 16 (interleaved rounds, medians), peak
RSS, and the TensorRT-for-RTX engine build time (on this CPU, for SM86).

    python bench/cifar_scale.py                       # everything (about 15-25 minutes on 2 cores)
    python bench/cifar_scale.py --samplers em --precisions fp32 --no-trt

The parity check feeds the same inputs to the eager step modules and to the ONNX graph for one call of each graph
at batch 3 (traced at 2): max |a - b| relative to max |a| (fp32 should be ~1e-6; fp16 ~1e-3).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SPEC = "score_sde-random:config=cifar10_ddpmpp_continuous,seed=0"


def parity_one_call(bundle, eager, backend) -> float:
    """Worst relative max-abs over each graph's outputs, one call with fresh inputs at batch 3."""
    m = bundle.manifest
    rng = np.random.default_rng(0)
    worst = 0.0
    for key, graph in m.graphs.items():
        feed = {}
        for spec in graph.inputs:
            if spec.name in m.schedule:
                feed[spec.name] = np.full(3, m.schedule[spec.name][len(m.schedule[spec.name]) // 2], np.float32)
            else:
                feed[spec.name] = rng.standard_normal((3, *m.model.sample_shape)).astype(np.float32)
                if spec.name == "mask":
                    feed[spec.name] = (feed[spec.name] > 0).astype(np.float32)
        want, got = eager(key, feed), backend(key, feed)
        for name, w in want.items():
            worst = max(worst, float(np.abs(got[name] - w).max() / max(1e-12, np.abs(w).max())))
    return worst


def eager_loop_ms(model, batch: int, steps: int) -> float:
    """A diffusers-style eager Euler-Maruyama loop around the torch model (no graph, no ONNX): ms/step."""
    import torch

    from vpsde.models.sde import VPSDE

    sde = VPSDE()
    x = torch.randn(batch, *model.sample_shape)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for t in torch.linspace(1.0, 1e-3, steps):
            tv = t.repeat(batch)
            beta = sde.beta(tv)[:, None, None, None]
            score = -model(x, tv) / sde.std(tv)[:, None, None, None]
            x = x + (0.5 * beta * x + beta * score) / steps + torch.sqrt(beta / steps) * torch.randn_like(x)
    return 1e3 * (time.perf_counter() - t0) / steps


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samplers", nargs="+", default=["em", "pc", "ancestral", "ode-heun", "dpmpp-2m", "dpmpp-3m",
                                                     "dpmpp-2m-sde", "edm-heun", "inpaint", "colorize"])
    p.add_argument("--precisions", nargs="+", default=["fp32", "fp16"])
    p.add_argument("--steps", type=int, default=10, help="timed steps per loop")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-trt", action="store_true", help="skip the TensorRT-for-RTX engine build")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    import torch

    from vpsde.export import VPSDE, export_bundle, load_model
    from vpsde.export.eager import EagerSide
    from vpsde.models.score_sde import parameter_count
    from vpsde.runtime import Sampler
    from vpsde.runtime.benchmark import peak_rss_mb
    from vpsde.verify.parity import BackendSide

    torch.set_num_threads(args.threads)
    model = load_model(SPEC, VPSDE())
    n_params = parameter_count(model.net)
    rows, timing = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        em_bundle = None
        for precision in args.precisions:
            for sampler in args.samplers:
                t0 = time.perf_counter()
                bundle = export_bundle(model, Path(tmp) / f"{sampler}-{precision}", sampler=sampler, steps=30,
                                       precision=precision, log=lambda _: None)
                seconds = time.perf_counter() - t0
                size = sum(f.stat().st_size for f in bundle.root.glob("*.onnx")) / 2**20
                rel = parity_one_call(bundle, EagerSide(bundle, SPEC), BackendSide(bundle, threads=args.threads))
                rows.append({"sampler": sampler, "precision": precision, "export_s": seconds, "graphs_mb": size,
                             "parity_rel_max_abs": rel})
                print(f"{sampler:<14}{precision:<6} export {seconds:6.1f} s  graphs {size:7.1f} MB  "
                      f"ONNX vs eager (batch 3) {rel:.2e}", file=sys.stderr, flush=True)
                if sampler == "em" and precision == "fp32":
                    em_bundle = bundle
        if em_bundle is not None:
            sampler = Sampler(em_bundle, progress=False, threads=args.threads)
            for batch in (1, 16):
                loop, eager = [], []
                sampler.sample(batch, seed=0, stop_after_steps=2)
                eager_loop_ms(model, batch, 2)
                for _ in range(args.rounds):
                    t0 = time.perf_counter()
                    sampler.sample(batch, seed=0, stop_after_steps=args.steps)
                    loop.append(1e3 * (time.perf_counter() - t0) / args.steps)
                    eager.append(eager_loop_ms(model, batch, args.steps))
                timing[batch] = {"vpsde_ort_ms_per_step": statistics.median(loop),
                                 "eager_ms_per_step": statistics.median(eager),
                                 "ratio_eager_over_vpsde": statistics.median(e / v for e, v in zip(eager, loop))}
                print(f"batch {batch}: vpsde ORT {timing[batch]['vpsde_ort_ms_per_step']:.1f} ms/step, eager "
                      f"{timing[batch]['eager_ms_per_step']:.1f} ms/step ({timing[batch]['ratio_eager_over_vpsde']:.2f}x)",
                      file=sys.stderr, flush=True)
            if not args.no_trt:
                from vpsde.runtime.tensorrt.build import BatchProfile
                from vpsde.runtime.tensorrt.cache import build_cached
                from vpsde.runtime.tensorrt.flavor import load_flavor

                flavor = load_flavor("rtx")
                t0 = time.perf_counter()
                build_cached(em_bundle, "em", flavor, BatchProfile.parse("1:16:64"), ["SM86"], 3, False,
                             log=lambda _: None)
                timing["trt_rtx_build_s"] = time.perf_counter() - t0
                print(f"TensorRT for RTX engine (SM86, batch 1:16:64): built in {timing['trt_rtx_build_s']:.1f} s",
                      file=sys.stderr)
    result = {"model": SPEC, "parameters": n_params, "exports": rows, "timing": timing, "peak_rss_mb": peak_rss_mb()}
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
