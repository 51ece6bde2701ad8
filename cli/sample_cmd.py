"""``vpsde sample``: run a bundle's loop and write samples.npz (+ grid.png), in process or sharded on Ray."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from vpsde.cli.common import (UsageError, add_expect_digest, add_ray_args, check_last_index, noise_id, positive,
                               prepare_out_dir, ray_options, threads_arg, u64)
from vpsde.cli.conditioning import add_conditioning_args, conditioning_from_args
from vpsde.runtime.backends import BACKENDS, DEVICES
from vpsde.runtime.loop import NAN_GUARD_CHOICES


def register(sub, fmt) -> None:
    """Add the subcommand to ``sub`` (argparse subparsers); ``fmt``: the help formatter."""
    p = sub.add_parser("sample", help="draw samples from a bundle (no torch needed)", formatter_class=fmt,
                       description="Run the bundle's timestep loop and write samples.npz (+ grid.png for images).")
    p.add_argument("bundle", type=Path, help="bundle directory (from vpsde export)")
    add_expect_digest(p)
    p.add_argument("--out", type=Path, default=Path("out"), help="output directory")
    p.add_argument("--num", type=positive, default=64, help="number of samples")
    p.add_argument("--seed", type=u64("seed"), default=0, help="noise seed, 0 <= seed < 2^64")
    p.add_argument("--batch-size", type=positive, default=None,
                   help="samples per graph call (default: 64 on the CPU, where larger batches cost more per sample; all on a GPU)")
    p.add_argument("--first-sample", type=u64("index"), default=0,
                   help="global index of the first sample (for sharding: same seed, disjoint index ranges)")
    p.add_argument("--backend", default="onnxruntime", choices=BACKENDS,
                   help="onnxruntime (CPU, or its CUDA provider with --device cuda: needs onnxruntime-gpu); "
                        "onnxruntime-trt (ONNX Runtime's TensorRT execution provider, on the GPU); or tensorrt "
                        "(the engines `vpsde build` cached in the bundle; needs an NVIDIA GPU); or openvino (OpenVINO's "
                        "CPU plugin, vpsde[openvino]: runs bf16 bundles on the CPU; each graph is checked against "
                        "ONNX Runtime as it opens)")
    p.add_argument("--device", default=None, choices=DEVICES,
                   help="where tensors live (default: cpu for onnxruntime, cuda for the others)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="GPU only: capture each graph binding once as a CUDA graph and replay it")
    p.add_argument("--threads", type=threads_arg, default=None, help="intra-op CPU threads, 1..1024 (default: the CPUs this process may use)")
    p.add_argument("--noise", default=None, choices=["philox", "torch"], help="override the manifest's generator")
    p.add_argument("--nan-guard", default="auto", choices=list(NAN_GUARD_CHOICES),
                   help="NaN/Inf check: locate = the result, and if it is not finite the batch again checking every "
                        "output, so the error names the step (the CPU default: no cost per step); step = every "
                        "graph output as it is made; final = the result only (the GPU default); off")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_conditioning_args(p)
    add_ray_args(p, "samples", 1024, "--ray writes OUT/shards/*.npy and OUT/index.json (read them with "
                 "vpsde.scale.load_samples); rerunning the same command resumes")

def run(args: argparse.Namespace) -> None:
    import numpy as np

    from vpsde.runtime import Bundle, Sampler
    from vpsde.runtime.images import image_grid, save_npz, save_png

    check_last_index(args.first_sample, args.num, f"--num {args.num}")
    bundle = Bundle.load(args.bundle, expect_digest=args.expect_digest)
    if bundle.manifest.sampler.task != "sample":
        raise UsageError(f"{args.bundle} computes likelihoods (sampler.task {bundle.manifest.sampler.task!r}), it does "
                         "not sample: use vpsde likelihood")
    conditioning = conditioning_from_args(args, bundle)
    prepare_out_dir(args.out)  # before any graph call: a bad --out must not cost a sampling run
    if args.ray is not None:
        return _sample_on_ray(args, bundle, conditioning)
    sampler = Sampler(bundle, backend=args.backend, device=args.device, nan_guard=args.nan_guard,
                      progress=not args.no_progress, threads=args.threads, cuda_graph=args.cuda_graph)
    t0 = time.perf_counter()
    samples = sampler.sample(args.num, seed=args.seed, batch_size=args.batch_size, first_sample=args.first_sample,
                             generator=noise_id(args.noise), conditioning=conditioning)
    elapsed = time.perf_counter() - t0
    m = bundle.manifest
    npz = args.out / "samples.npz"
    save_npz(npz, samples=samples, seed=np.uint64(args.seed), first_sample=np.uint64(args.first_sample),
             generator=np.str_(noise_id(args.noise) or m.noise.generator), bundle=np.str_(str(args.bundle)),
             bundle_digest=np.str_(bundle.digest))
    batch_size = sampler.batch_size_for(args.num, args.batch_size, noise_id(args.noise))
    batches = -(-args.num // batch_size)
    print(f"sampled {args.num} x {m.model.sample_shape} in {elapsed:.2f} s "
          f"({m.sampler.steps} {m.sampler.name} steps, {sampler.device.name}): "
          f"{1000 * elapsed / (m.sampler.steps * batches):.2f} ms/step, {args.num / elapsed:.1f} samples/s")
    if m.sampler.params.get("coupling") == "batch" and batch_size < args.num:
        print("note: this bundle's corrector couples the samples of a batch (coupling = batch); samples depend "
              "on --batch-size", file=sys.stderr)
    print(f"wrote {npz}")
    if m.model.value_range and len(m.model.sample_shape) == 3:
        png = args.out / "grid.png"
        save_png(png, image_grid(samples, tuple(m.model.value_range)))
        print(f"wrote {png}")


def _sample_on_ray(args: argparse.Namespace, bundle, conditioning) -> None:
    from vpsde.runtime.images import image_grid, save_png
    from vpsde.scale import sample_on_ray
    from vpsde.scale.ray_sampling import first_samples

    t0 = time.perf_counter()
    report = sample_on_ray(bundle, args.num, args.seed, args.out, first_sample=args.first_sample,
                           **ray_options(args), backend=args.backend, device=args.device, threads=args.threads,
                           batch_size=args.batch_size, generator=noise_id(args.noise), conditioning=conditioning,
                           progress=not args.no_progress)
    m = bundle.manifest
    print(f"sampled {args.num} x {m.model.sample_shape} on Ray in {time.perf_counter() - t0:.2f} s "
          f"({m.sampler.steps} {m.sampler.name} steps)")
    print("\n".join(report.lines()))
    print(f"wrote {args.out / 'index.json'}")
    if m.model.value_range and len(m.model.sample_shape) == 3:
        png = args.out / "grid.png"
        save_png(png, image_grid(first_samples(args.out, 64), tuple(m.model.value_range)))
        print(f"wrote {png}")
