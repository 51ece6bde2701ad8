"""How often `vpsde parity` passes a correct bundle over random seeds, and which calls it re-judged by their float32
rounding spread (docs/parity.md, "Ill-conditioned calls"): a bundle compared with its eager float32 reference, ``--seeds`` seeds
drawn from ``--draw``.

    python bench/parity_seeds.py BUNDLE [--seeds 200] [--draw 7] [--num 3]

One line per seed that re-judged a call or failed: seed, verdict, and per re-judged output (step, name, max |d|
between the sides, the float32 rounding spread, their ratio); then the totals: seeds past the fixed bars (what
failed before 0.5.10) and seeds that fail now.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from vpsde.export.eager import EagerSide
from vpsde.runtime import Bundle
from vpsde.verify.parity import BackendSide, compare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle")
    parser.add_argument("--seeds", type=int, default=200)
    parser.add_argument("--draw", type=int, default=7, help="seed of the generator the seeds are drawn from")
    parser.add_argument("--num", type=int, default=3, help="samples per comparison")
    args = parser.parse_args()
    bundle = Bundle.load(args.bundle)
    reference, test = EagerSide(bundle), BackendSide(bundle)
    draw = np.random.default_rng(args.draw)
    past_bars = failed = 0
    started = time.monotonic()
    for _ in range(args.seeds):
        seed = int(draw.integers(2**32))
        report = compare(bundle.manifest, reference, test, num=args.num, seed=seed, progress=False)
        judged = report.spread_judged
        past_bars += bool(judged) or not report.passed
        failed += not report.passed
        if judged or not report.passed:
            print(seed, "ok" if report.passed else "FAIL", " ".join(
                f"[step {c.step} {k}: max |d| {c.max_abs[k]:.2e}, spread {c.spread[k]:.2e}, ratio "
                f"{c.max_abs[k] / c.spread[k]:.2f}]" for c, k in judged), flush=True)
    print(f"{args.seeds} seeds: {past_bars} past the fixed bars, {failed} fail; {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
