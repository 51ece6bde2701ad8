"""Samples/s (or log-likelihoods/s) on Ray with 1 and 2 workers against the in-process Sampler, on one bundle, in
one run.

    make bench-ray                                   # runs this in a private network namespace (loopback only)
    python bench/ray_scaling.py --steps 50 --num 256 --shard-size 32 [--address ray://head:10001]
    python bench/ray_scaling.py --likelihood --steps 8 --num 64 --shard-size 8 --batch-size 8   # log p of points

With --likelihood the bundle is a likelihood bundle (default: digits, Hutchinson, --steps RK4 steps) and the
inputs are the held-out digits dequantized as `vpsde likelihood` does (seed 0), cycled to --num; "samples" below
then means inputs.

Every contender uses one intra-op thread per worker, the same bundle, seed and batch size; the in-process run is
timed before and after the Ray runs (both printed). Reported per Ray run: wall time (with Ray's and the workers'
start-up), samples/s over the sampling window (from the first shard's start, i.e. its arrival time minus its
compute time, to the last arrival: start-up excluded), the workers' own rate (samples / seconds inside
Sampler.sample), and the per-shard overhead: the fraction of worker time in that window not spent inside
Sampler.sample (scheduling, transfer, the driver's write, idle). On a 2-core machine two workers can at best double one worker; the driver
and Ray's own processes share those cores, so the 2-worker figure is a floor for what separate machines give.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, default=None, help="a bundle (default: export digits EM with --steps)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--num", type=int, default=256)
    p.add_argument("--shard-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--address", default=None, help="an existing Ray cluster (default: a local instance)")
    p.add_argument("--likelihood", action="store_true", help="log-likelihoods of data (likelihood_on_ray)")
    args = p.parse_args()

    import numpy as np
    import ray

    from vpsde.runtime import Bundle, Sampler
    from vpsde.scale import load_samples
    from vpsde.scale.ray_sampling import likelihood_on_ray, sample_on_ray

    work = Path(tempfile.mkdtemp(prefix="vpsde-bench-ray-"))
    bundle = args.bundle
    if bundle is None:
        from vpsde.export import VPSDE, export_bundle, load_model

        options = {"sampler": "likelihood"} if args.likelihood else {"grid": "uniform"}
        bundle = export_bundle(load_model("digits", VPSDE()), work / "bundle", steps=args.steps,
                               log=lambda _: None, **options).root
    points = held_out_points(args.num, Bundle.load(bundle).manifest.noise.generator) if args.likelihood else None

    def in_process() -> tuple[float, "np.ndarray"]:
        t0 = time.perf_counter()
        sampler = Sampler(bundle, progress=False, threads=1)
        x = sampler.log_likelihood(points, 0, batch_size=args.batch_size) if args.likelihood else \
            sampler.sample(args.num, seed=0, batch_size=args.batch_size)
        return args.num / (time.perf_counter() - t0), x

    def on_ray(k: int, out: Path, on_shard) -> None:
        common = dict(shard_size=args.shard_size, workers=k, batch_size=args.batch_size, threads=1, progress=False,
                      on_shard=on_shard)
        if args.likelihood:
            likelihood_on_ray(bundle, points, 0, out, **common)
        else:
            sample_on_ray(bundle, args.num, 0, out, **common)

    before, reference = in_process()
    rows = []
    for k in args.workers:
        ray.init(address=args.address, num_cpus=None if args.address else k, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
        done: list[tuple[float, int, float]] = []  # (arrival time, samples, compute seconds)
        out = work / f"ray{k}"
        t0 = time.perf_counter()
        on_ray(k, out, lambda r: done.append((time.perf_counter(), r["num"], r["seconds"])))
        wall = time.perf_counter() - t0
        ray.shutdown()
        assert np.array_equal(np.asarray(load_samples(out)), reference), "Ray results differ from the in-process run"
        window = done[-1][0] - min(t - secs for t, _, secs in done)
        compute = sum(secs for _, _, secs in done)
        rows.append((k, wall, args.num / window, args.num / compute, 1 - compute / (k * window)))
    after, _ = in_process()
    inproc = (before + after) / 2
    what = "log-likelihoods" if args.likelihood else "samples"
    print(f"machine: {os.cpu_count()} cores; bundle {bundle}; {args.num} {what}, shards of {args.shard_size}, "
          f"batch {args.batch_size}")
    print(f"in-process Sampler (1 thread): {before:.1f} samples/s before the Ray runs, {after:.1f} after")
    print("| workers | wall s (with start-up) | samples/s (window) | vs in-process | worker rate | per-shard overhead |")
    print("|---:|---:|---:|---:|---:|---:|")
    for k, wall, rate, worker_rate, overhead in rows:
        print(f"| {k} | {wall:.1f} | {rate:.1f} | {rate / inproc:.2f}x | {worker_rate:.1f} | {overhead:.0%} |")
    sys.stdout.flush()


def held_out_points(num: int, generator: str):
    """float32 [num, 1, 16, 16]: the held-out digits as 8-bit images, dequantized (seed 0), cycled to ``num``."""
    import numpy as np

    from likelihood_digits import to_pixels  # bench/, next to this script
    from vpsde.models.digits_data import train_heldout_split
    from vpsde.runtime.likelihood import dequantize

    _, (held, _) = train_heldout_split()
    return dequantize(to_pixels(held)[np.arange(num) % len(held)], (-1.0, 1.0), 0, 0, generator)


if __name__ == "__main__":
    main()
