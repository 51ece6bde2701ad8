"""Quality vs cost of every sampler on the Gaussian-mixture ground truth (exact score, known distribution).

For each sampler and NFE budget, exports a bundle of the analytic mixture score with the step count that
spends that many model evaluations (``steps_for_nfe``) on the sampler's default grid, falling back to the
"logsnr" grid where score_sde's discrete betas are invalid (pc / ancestral with N <= beta_max; marked †),
samples --num points on ONNX Runtime (portable philox noise) and scores them with ``models/gmm_eval.py``
against the true mixture. The first rows score exact samples of the same size (--floor-draws of them, median and
largest): the sampling-noise floor. The last column is the worst ratio of a figure to the largest exact draw's
(MMD² left out: it is centred on 0): <= 1 is "within the exact-draw floor on every statistic".

    python bench/gmm_samplers.py --num 20000 --out docs/gmm_samplers.md                     # 2-D, diagonal
    python bench/gmm_samplers.py --model gmm:dim=4,components=5,full=1 --out docs/gmm_samplers_4d.md
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samplers", nargs="+", default=["em", "pc", "pc:coupling=batch", "ancestral", "ode-euler",
                                                      "ode-heun", "dpmpp-2m"],
                   help="sampler ids, with options as SAMPLER:key=value,... (grid; pc: snr, coupling, corrector_steps; unipc: order, variant; "
                        "dpmpp-*: denoise_final=1; grid=tuned: tune_seed, tune_samples)")
    p.add_argument("--nfe", nargs="+", type=int, default=[10, 20, 50, 100, 1000])
    p.add_argument("--model", default="gmm:dim=2,components=3,seed=0", help="a gmm model spec")
    p.add_argument("--num", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--floor-draws", type=int, default=10, help="exact samples scored for the noise floor")
    p.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    args = p.parse_args(argv)

    from vpsde.export import export_bundle, load_model, steps_for_nfe
    from vpsde.export.bundle import default_std_formula
    from vpsde.models.gmm_eval import exact_floor, mixture_errors
    from vpsde.models.sde import VPSDE
    from vpsde.runtime import Sampler

    rng = np.random.default_rng(args.seed)
    mix = load_model(args.model, VPSDE()).mixture
    floor = exact_floor(mix, args.num, args.floor_draws, rng)
    rows = [(f"exact samples, median of {args.floor_draws} draws (noise floor)", "", "", floor["median"], 0.0),
            (f"exact samples, largest of {args.floor_draws} draws", "", "", floor["max"], 0.0)]
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.samplers:
            sampler, _, opts = spec.partition(":")
            spec_options = {k: (v if k in ("coupling", "grid", "variant") else float(v) if k == "snr" else int(v))
                            for k, v in (o.split("=") for o in opts.split(",") if o)}
            for nfe in args.nfe:
                options = dict(spec_options)
                where = Path(tmp) / f"{spec.replace(':', '-').replace(',', '-').replace('=', '-')}-{nfe}"
                steps = steps_for_nfe(sampler, nfe, options.get("corrector_steps", 1))
                grid, mark = options.pop("grid", None), ""
                if "tune_seed" in options or "tune_samples" in options:
                    from vpsde.export.tuning import Tuning

                    options["tuning"] = Tuning(**{k: options.pop(f"tune_{k}") for k in ("seed", "samples")
                                                  if f"tune_{k}" in options})
                sde = VPSDE(std_formula=default_std_formula(sampler, None))
                model = load_model(args.model, sde)
                try:
                    bundle = export_bundle(model, where, sampler=sampler, steps=steps, grid=grid,
                                           sde=sde, log=lambda _: None, **options)
                except ValueError:  # score_sde's betas need N > beta_max
                    grid, mark = "logsnr", " †"
                    sde = VPSDE(std_formula="expm1")
                    bundle = export_bundle(load_model(args.model, sde), where,
                                           sampler=sampler, steps=steps, grid=grid, sde=sde, log=lambda _: None,
                                           **options)
                t0 = time.perf_counter()
                x = Sampler(bundle, progress=False, threads=args.threads).sample(args.num, seed=args.seed)
                seconds = time.perf_counter() - t0
                errors = mixture_errors(mix, x, rng)
                m = bundle.manifest
                rows.append((spec, f"{m.sampler.params['nfe']}", f"{m.sampler.steps} {m.sampler.grid}{mark}",
                             errors, seconds))
                print(f"{spec:<10} NFE {nfe:>5}: " + ", ".join(f"{k} {v:.3g}" for k, v in errors.items())
                      + f"; worst/floor {worst(errors, floor['max']):.2f}", file=sys.stderr, flush=True)

    lines = [f"Gaussian mixture `{args.model}`, {args.num} samples per cell, seed {args.seed}, ONNX Runtime CPU "
             f"({args.threads} thread).", "",
             "| sampler | NFE | steps, grid | weight | mean | cov | component FD | SW1 | low density | MMD² "
             "| worst / max floor | seconds |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, nfe, steps, e, seconds in rows:
        lines.append(f"| {name} | {nfe} | {steps} | {e['weight_error']:.4f} | {e['mean_error']:.3f} | "
                     f"{e['cov_error']:.3f} | {e['component_fd']:.2e} | {e['sw1']:.4f} | {e['low_density']:.4f} | "
                     f"{e['mmd2']:.1e} | {worst(e, floor['max']):.2f} | {seconds:.1f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")


def worst(errors: dict[str, float], ceiling: dict[str, float]) -> float:
    """The largest ratio figure / largest exact draw's figure (MMD² excluded: centred on 0, often negative)."""
    return max(errors[k] / ceiling[k] for k in errors if k != "mmd2")


if __name__ == "__main__":
    main()
