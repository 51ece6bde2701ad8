"""``vpsde likelihood``: log-likelihood and bits/dim of data under a likelihood bundle (likelihood.json + a
histogram), in process or sharded on Ray."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from vpsde.cli.common import (UsageError, add_expect_digest, add_ray_args, check_last_index, positive,
                               prepare_out_dir, ray_options, threads_arg, u64)
from vpsde.runtime.backends import BACKENDS, DEVICES


def register(sub, fmt) -> None:
    """Add the subcommand to ``sub`` (argparse subparsers); ``fmt``: the help formatter."""
    p = sub.add_parser("likelihood", help="log-likelihood and bits/dim of data (bundle from --sampler likelihood)",
                       formatter_class=fmt,
                       description="Integrate the probability-flow ODE from each data point with the bundle's "
                                   "likelihood program; write OUT/likelihood.json (nll in nats and bits/dim per "
                                   "input, their mean and standard error) and OUT/likelihood.png (histogram).")
    p.add_argument("bundle", type=Path, help="bundle directory (vpsde export --sampler likelihood)")
    add_expect_digest(p)
    p.add_argument("--data", type=Path, required=True,
                   help="a .npy of real-valued points [N, *sample_shape] in the model's space (float32/float64), a "
                        ".npy of uint8 images [N, *sample_shape], or a directory of PNG images; images are "
                        "dequantized with seeded uniform noise and their bits/dim carry score_sde's offset "
                        "8 - log2(hi - lo) for the model's value range")
    p.add_argument("--out", type=Path, default=Path("out"), help="output directory")
    p.add_argument("--seed", type=u64("seed"), default=0,
                   help="seed of the Hutchinson probes and of the dequantization noise, 0 <= seed < 2^64")
    p.add_argument("--first-sample", type=u64("index"), default=0,
                   help="global index of the first input (its noise stream: for sharding a data set)")
    p.add_argument("--batch-size", type=positive, default=None, help="inputs per graph call (default: 64 on the CPU)")
    p.add_argument("--backend", default="onnxruntime", choices=BACKENDS, help="as for vpsde sample")
    p.add_argument("--device", default=None, choices=DEVICES, help="as for vpsde sample")
    p.add_argument("--threads", type=threads_arg, default=None, help="intra-op CPU threads, 1..1024 (default: the CPUs this process may use)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_ray_args(p, "inputs", 256, "--ray also writes OUT/shards/*.npy (log p per input, float64) and OUT/index.json "
                 "(with the data's sha256); rerunning the same command resumes")


def run(args: argparse.Namespace) -> None:
    import numpy as np

    from vpsde.runtime import Bundle, Sampler
    from vpsde.runtime.likelihood import figures, load_data

    bundle = Bundle.load(args.bundle, expect_digest=args.expect_digest)
    m = bundle.manifest
    if m.sampler.task != "likelihood":
        raise UsageError(f"{args.bundle} samples ({m.sampler.name}); export a likelihood bundle with "
                         "vpsde export --sampler likelihood")
    value_range = tuple(m.model.value_range) if m.model.value_range else None
    data = load_data(args.data, m.model.sample_shape, value_range)
    check_last_index(args.first_sample, len(data), f"{len(data)} inputs")
    prepare_out_dir(args.out, "likelihood.json")
    points = data.model_points(value_range, args.seed, args.first_sample, m.noise.generator)
    t0 = time.perf_counter()
    if args.ray is not None:
        from vpsde.scale import likelihood_on_ray, load_samples

        run_report = likelihood_on_ray(bundle, points, args.seed, args.out, first_sample=args.first_sample,
                                       **ray_options(args), backend=args.backend, device=args.device,
                                       threads=args.threads, batch_size=args.batch_size,
                                       progress=not args.no_progress)
        logp = np.asarray(load_samples(args.out))
        print("\n".join(run_report.lines()))
    else:
        sampler = Sampler(bundle, backend=args.backend, device=args.device, progress=not args.no_progress,
                          threads=args.threads)
        logp = sampler.log_likelihood(points, seed=args.seed, batch_size=args.batch_size,
                                      first_sample=args.first_sample)
    elapsed = time.perf_counter() - t0
    params = m.sampler.params
    report = {"bundle": str(args.bundle), "bundle_digest": bundle.digest, "data": data.source,
              "seed": args.seed, "first_sample": args.first_sample, "divergence": params.get("divergence"),
              "probes": params.get("probes"), "steps": m.sampler.steps, **figures(logp, data, value_range)}
    n = len(data)
    write_report(report, args.out, f"{n} inputs in {elapsed:.2f} s{' on Ray' if args.ray is not None else ''} "
                 f"({1000 * elapsed / n:.2f} ms each, {m.sampler.steps} RK4 steps, {params.get('divergence')} "
                 "divergence)")


def write_report(report: dict, out: Path, what: str) -> None:
    """Write OUT/likelihood.json and OUT/likelihood.png (the bits/dim histogram, where matplotlib is installed) and
    print ``what`` with the mean bits/dim and nll."""
    from vpsde.runtime.manifest import atomic_write_text

    atomic_write_text(out / "likelihood.json", json.dumps(report, indent=1) + "\n")
    print(f"{what}: {report['mean_bpd']:.4f} +- {report['stderr_bpd']:.4f} bits/dim, mean nll "
          f"{report['mean_nll']:.4f} nats")
    print(f"wrote {out / 'likelihood.json'}")
    try:
        _histogram(report["bpd"], out / "likelihood.png", report["data"])
        print(f"wrote {out / 'likelihood.png'}")
    except UsageError as e:  # no matplotlib: the numbers are written, the picture is optional
        print(f"note: {e}")


def _histogram(bpd, path: Path, label: str) -> None:
    from vpsde.runtime import plots
    from vpsde.runtime.errors import InputError

    try:
        plt = plots.pyplot("the likelihood histogram")
    except InputError as e:
        raise UsageError(str(e)) from None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(bpd, bins=min(50, max(5, len(bpd) // 4)), label=Path(label).name)
    ax.set_xlabel("bits/dim")
    ax.set_ylabel("inputs")
    plots.save(fig, [ax], path)
