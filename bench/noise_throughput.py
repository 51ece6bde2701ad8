"""Can the host's noise keep up with a fast device step? Times the host side of the loop, drawing noise calls in
line or prefetched at depths 1, 2, 4 (each depth one thread), against a simulated device step: ``time.sleep``
of --step-ms, which, like waiting on a GPU stream, releases the GIL. All variants run side by side in one
process, medians of --repeats. Values are the same in every variant (tests/test_noise.py).

    python bench/noise_throughput.py --batch 64 --shape 3,32,32 --step-ms 5 --calls 100
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from vpsde.runtime.noise import PhiloxNoise
from vpsde.runtime.prefetch import PrefetchedNoise


def run(depth: int | None, args, shape) -> float:
    """Seconds for --calls steps: take (or draw) one noise call, then 'run the step'."""
    noise = PhiloxNoise(0)
    t0 = time.perf_counter()
    if depth is None:
        for c in range(1, args.calls + 1):
            noise(c, 0, args.batch, shape)
            time.sleep(args.step_ms / 1e3)
    else:
        with PrefetchedNoise(noise, 0, args.batch, shape, 1, args.calls, depth) as stream:
            for _ in range(args.calls):
                stream.take()
                time.sleep(args.step_ms / 1e3)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--shape", default="3,32,32")
    p.add_argument("--step-ms", type=float, default=5.0, help="simulated device step (sleep), ms")
    p.add_argument("--calls", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--depths", type=int, nargs="+", default=[1, 2, 4])
    args = p.parse_args(argv)
    shape = tuple(int(s) for s in args.shape.split(","))
    n = args.batch * int(np.prod(shape))
    t0 = time.perf_counter()
    PhiloxNoise(0)(1, 0, args.batch, shape)
    one = time.perf_counter() - t0
    print(f"noise call: batch {args.batch} x {shape} = {n} normals, {1e3 * one:.2f} ms on one thread; "
          f"simulated step {args.step_ms} ms; {os.cpu_count()} cores; median of {args.repeats}")
    variants = [None, *args.depths]
    times = {v: [] for v in variants}
    for _ in range(args.repeats):
        for v in variants:  # interleaved, so drift in machine load hits every variant alike
            times[v].append(run(v, args, shape))
    floor = args.step_ms
    print(f"{'noise':<22}{'ms/step':>10}{'over the step':>15}")
    for v in variants:
        ms = 1e3 * statistics.median(times[v]) / args.calls
        print(f"{'in line' if v is None else f'prefetched, depth {v}':<22}{ms:>10.2f}{ms / floor:>14.2f}x")


if __name__ == "__main__":
    main()
