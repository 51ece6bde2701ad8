"""The sampling loop against N bare calls of its graphs, in one process, interleaved rounds with the order rotated,
per NaN-guard mode: what the loop itself costs on top of the graph calls (docs/cpu.md, "Loop overhead").

The bare calls are the loop's own: the graph calls of one seed-0 trajectory, each call's inputs staged beforehand
(``ReplayedCalls``); the ratios are against them. For contrast, "bare, fixed buffers" launches the same number of
calls on one set of buffers, whose contents do not change the way the loop's do (a CPU call's time depends on its
inputs: denormals), so it measures different arithmetic.

    python bench/loop_overhead.py BUNDLE [--batch 1] [--rounds 16] [--threads 1] [--guards locate off]
"""

from __future__ import annotations

import argparse
import statistics
import time

from vpsde.runtime import Sampler
from vpsde.runtime.benchmark import ReplayedCalls, bare_step_seconds

GUARDS = ("locate", "step", "final", "off")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--guards", nargs="+", choices=GUARDS, default=list(GUARDS), help="NaN-guard modes to time")
    args = p.parse_args(argv)
    sampler = Sampler(args.bundle, progress=False, threads=args.threads)  # one session for every row: sessions
    steps = sampler.manifest.sampler.steps                                   # of one graph differ by a few %

    def loop(guard: str) -> None:
        sampler.nan_guard = guard
        sampler.sample(args.batch, seed=0)

    runs = {f"loop, nan_guard={g}": (lambda g=g: loop(g)) for g in args.guards}
    runs["bare graph calls"] = ReplayedCalls(sampler, args.batch, steps).seconds
    runs["bare, fixed buffers"] = lambda: bare_step_seconds(sampler, args.batch, steps)
    for run in runs.values():
        run()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in runs}
    names = list(runs)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - t0)
    bare = times["bare graph calls"]
    print(f"{args.bundle}: batch {args.batch}, {steps} steps, {args.threads} thread(s), {args.rounds} rounds")
    print(f"{'':<26}{'ms/step':>10}{'x bare':>10}")
    for name, t in times.items():
        ratio = statistics.median(a / b for a, b in zip(t, bare))
        print(f"{name:<26}{1e3 * statistics.median(t) / steps:>10.3f}{ratio:>10.3f}")


if __name__ == "__main__":
    main()
