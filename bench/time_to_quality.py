"""Time to quality on the shipped digits model: seconds for 64 samples on one CPU thread, per sampler, NFE and
precision, next to each run's quality from bench/digits_quality.py, and the fastest run within EM-1000's band.

    python bench/digits_quality.py unipc/grid=tuned:10 ... --num 1000 --out out/quality    # quality first
    python bench/time_to_quality.py unipc/grid=tuned:10 ... --quality out/quality/quality.json

Each run (digits_quality's SAMPLER[/OPTION=VALUE,...]:NFE) is the bundle digits_quality left in --bundles
(OUT/<run>.bundle, so a tuned grid is the one whose quality was measured) or else exported once (not timed), then
``Sampler(threads=1).sample(64, seed, batch_size=64)`` is timed --rounds times after a warm-up, runs interleaved
round by round; the median is reported. "Within EM-1000's band": the Fréchet distance within two standard errors of
the difference from EM-1000's, and the classifier's mean confidence at most two standard errors below EM-1000's.
The EM-1000 reference is the bundle row of docs/samplers.md's digits table (same yardstick, seed 0, n = 1000): FD
1.24 +- 0.44 (bootstrap SE), confidence 0.980; the confidence's SE at n = 1000 is 0.003 (per-sample SD 0.07-0.10,
measured), so the band's floor is 0.980 - 2 * 0.003 * sqrt(2) = 0.972. Override with --reference-*.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from digits_quality import parse_run, run_name, split_options  # noqa: E402


def export(spec: str, nfe: int, root: Path):
    from vpsde.export import export_bundle, load_model, steps_for_nfe
    from vpsde.export.bundle import default_std_formula
    from vpsde.models.sde import VPSDE

    sampler, options = split_options(spec)
    sde = VPSDE(std_formula=default_std_formula(sampler, None))
    steps = steps_for_nfe(sampler, nfe, options.get("corrector_steps", 1))
    return export_bundle(load_model("digits", sde), root, sampler=sampler, steps=steps, sde=sde, value_range=(-1, 1),
                         log=lambda m: None, **options)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=parse_run, help="SAMPLER[/OPTION=VALUE,...]:NFE, as bench/digits_quality.py")
    p.add_argument("--quality", type=Path, default=Path("out/quality/quality.json"))
    p.add_argument("--bundles", type=Path, default=Path("out/quality"), help="where digits_quality left its bundles")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--num", type=int, default=64)
    p.add_argument("--reference-fd", type=float, nargs=2, default=(1.24, 0.44), metavar=("FD", "SE"))
    p.add_argument("--reference-confidence", type=float, nargs=2, default=(0.980, 0.003), metavar=("MEAN", "SE"))
    args = p.parse_args()

    import torch

    from vpsde.runtime import Sampler

    torch.set_num_threads(1)
    quality = json.loads(args.quality.read_text()) if args.quality.is_file() else {}
    with tempfile.TemporaryDirectory() as tmp:
        samplers = {}
        for spec, nfe, _ in args.runs:
            name = run_name(spec, nfe)
            bundle = args.bundles / f"{name}.bundle"
            if not (bundle / "manifest.json").is_file():
                print(f"exporting {name}...", file=sys.stderr, flush=True)
                bundle = export(spec, nfe, Path(tmp) / name).root
            samplers[name] = Sampler(bundle, progress=False, threads=1)
            samplers[name].sample(args.num, seed=0, batch_size=args.num)  # warm-up
        times: dict[str, list[float]] = {name: [] for name in samplers}
        for r in range(args.rounds):
            for name, sampler in samplers.items():
                t0 = time.perf_counter()
                sampler.sample(args.num, seed=r + 1, batch_size=args.num)
                times[name].append(time.perf_counter() - t0)
    fd0, fd_se0 = args.reference_fd
    conf0, conf_se0 = args.reference_confidence
    conf_floor = conf0 - 2 * conf_se0 * np.sqrt(2)
    print(f"{args.num} samples at batch {args.num}, one thread, median of {args.rounds} rounds; EM-1000 reference: FD "
          f"{fd0} +- {fd_se0}, confidence {conf0} (band floor {conf_floor:.3f})")
    print("| run | seconds | FD to train | ± SE | FD in band | confidence | confidence in band |")
    print("|---|---:|---:|---:|---|---:|---|")
    best = {}
    for name, ts in sorted(times.items(), key=lambda kv: np.median(kv[1])):
        q = quality.get(name)
        seconds = float(np.median(ts))
        if q is None:
            print(f"| {name} | {seconds:.3f} | (no quality for {name} in {args.quality}) | | | | |")
            continue
        fd_ok = abs(q["fd_to_train"] - fd0) <= 2 * np.hypot(q["fd_bootstrap_se"], fd_se0)
        conf_ok = q["mean_confidence"] >= conf_floor
        print(f"| {name} | {seconds:.3f} | {q['fd_to_train']:.2f} | {q['fd_bootstrap_se']:.2f} | {'yes' if fd_ok else 'no'} "
              f"| {q['mean_confidence']:.3f} | {'yes' if conf_ok else 'no'} |")
        for key, ok in (("FD", fd_ok), ("FD and confidence", fd_ok and conf_ok)):
            if ok and key not in best:
                best[key] = (name, seconds)
    for key in ("FD", "FD and confidence"):
        name, seconds = best.get(key, ("none", float("nan")))
        print(f"fastest within EM-1000's band on {key}: {name}, {seconds:.3f} s for {args.num} samples")


if __name__ == "__main__":
    main()
