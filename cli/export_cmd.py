"""``vpsde export``: a score model and a sampler's step graphs into a bundle (needs torch)."""

from __future__ import annotations

import argparse
from pathlib import Path

from vpsde.cli.common import UsageError, noise_id, positive, shape_arg
from vpsde.runtime.manifest import PRECISIONS


SAMPLER_IDS = ("em", "pc", "ancestral", "ode-euler", "ode-heun", "dpmpp-2m", "dpmpp-3m", "dpmpp-2m-sde", "edm-heun",
               "ipndm", "unipc", "inpaint", "colorize", "likelihood")  # == export.samplers.SAMPLERS


DEFAULT_STEPS = {"ode-euler": 100, "ode-heun": 50, "dpmpp-2m": 20, "dpmpp-3m": 20, "dpmpp-2m-sde": 20, "edm-heun": 10,
                 "ipndm": 10, "unipc": 10, "likelihood": 32}


SAMPLER_HELP = ("em = Euler-Maruyama (diffusers' step_pred); pc = Langevin corrector + reverse-diffusion predictor "
                "(score_sde PC); ancestral = DDPM ancestral; ode-euler / ode-heun = probability-flow ODE (Heun: "
                "2 NFE per step); dpmpp-2m / dpmpp-3m = DPM-Solver++(2M) / (3M), the few-step samplers; dpmpp-2m-sde = "
                "SDE-DPM-Solver++(2M) (host noise); edm-heun = Karras et al.'s Heun on the edm grid (2 NFE per step); "
                "ipndm = iPNDM (4th-order Adams-Bashforth on eps); unipc = UniPC (predictor-corrector "
                "multistep, 1 NFE per step; --order, --variant); "
                "inpaint = EM that re-imposes known pixels (sample with --known/--mask); colorize = EM that keeps a "
                "gray level (3-channel models; sample with --known); likelihood = not a sampler: the probability-flow "
                "ODE from the data with its divergence, for `vpsde likelihood` (RK4, 4 NFE per step; --divergence, "
                "--probes, --probe)")


def register(sub, fmt) -> None:
    """Add the subcommand to ``sub`` (argparse subparsers); ``fmt``: the help formatter."""
    p = sub.add_parser("export", help="export a score model + sampler step to a bundle (needs torch)",
                       formatter_class=fmt, description="Export the sampler step around a score model to ONNX "
                       "and write a bundle directory (graphs + manifest.json).")
    p.add_argument("--model", required=True,
                   help="model spec: digits (shipped) | weights:PATH.json | diffusers:DIR | "
                        "gmm[:dim=2,components=3,seed=0,full=0] | unet-random[:seed=0,channels=16] | conv-random[:seed=0] | "
                        "score_sde:CHECKPOINT.pth[,config=NAME|JSON][,ema=true] | py:package.module:factory | "
                        "py:path/to/file.py:factory")
    p.add_argument("--out", required=True, type=Path, help="bundle directory to write")
    p.add_argument("--sampler", default="em", choices=list(SAMPLER_IDS), help=SAMPLER_HELP)
    p.add_argument("--steps", type=positive, default=None,
                   help="number of sampler steps N (default: 1000; ode-euler 100, ode-heun 50, dpmpp-* 20, edm-heun, "
                        "ipndm, unipc 10)")
    p.add_argument("--nfe", type=positive, default=None,
                   help="instead of --steps: the model-evaluation budget (pc: steps x (corrector steps + 1); "
                        "ode-heun: 2 per step)")
    p.add_argument("--grid", default=None, choices=["diffusers", "uniform", "logsnr", "edm", "tuned"],
                   help="time grid (default: diffusers for em/pc/ancestral/inpaint, logsnr for the ODE and "
                        "DPM-Solver++, iPNDM and UniPC samplers, edm for edm-heun): diffusers = linspace(1, eps, N) with dt = -1/N (bit parity with diffusers, "
                        "score_sde's discrete betas); uniform = N equal steps from 1 to eps; logsnr = equal steps in "
                        "log(alpha/sigma); edm = Karras et al.'s rho = 7 steps in sigma/alpha; tuned = searched for "
                        "this model at export (the deterministic samplers; GITS: dynamic programming against teacher "
                        "trajectories, --tune-samples, --tune-seed)")
    p.add_argument("--tune-samples", type=positive, default=None,
                   help="--grid tuned: teacher trajectories from the prior (default: 256)")
    p.add_argument("--tune-seed", type=int, default=None, help="--grid tuned: seed of the teacher's prior draws (default: 0)")
    p.add_argument("--snr", type=float, default=None,
                   help="pc: Langevin corrector signal-to-noise ratio (default: 0.10 with --coupling expected, 0.16 "
                        "(score_sde's) with batch or per-sample)")
    p.add_argument("--corrector-steps", type=positive, default=None,
                   help="pc: Langevin steps before each predictor step (default: 1)")
    p.add_argument("--coupling", default=None, choices=["expected", "batch", "per-sample"],
                   help="pc: Langevin step size 2 alpha (snr |z| / |score|)^2 with the norms' expectations "
                        "(expected: 2 alpha (snr sigma_t)^2, each sample independent of its batch; at the exact-truth "
                        "floor, docs/samplers.md), batch-averaged norms (batch: score_sde exactly; samples depend on "
                        "their batch) or each sample's own norms (per-sample: unstable in low dimensions) (default: expected)")
    p.add_argument("--noise", default="philox", choices=["philox", "torch"],
                   help="default noise generator recorded in the manifest (philox = portable spec)")
    p.add_argument("--denoise-final", action="store_true",
                   help="dpmpp-*, unipc: make the last step the jump from t = eps to t = 0, so the sample is the model's "
                        "data prediction at eps (diffusers' final_sigmas_type='zero'); the other steps span 1..eps")
    p.add_argument("--order", type=int, choices=[2, 3], default=None, help="unipc: solver order (default: 3)")
    p.add_argument("--divergence", choices=["exact", "hutchinson"], default=None,
                   help="likelihood: the drift's divergence exactly (one JVP per sample element and stage; at most "
                        "64 elements) or by Hutchinson's estimator (one JVP per probe; default)")
    p.add_argument("--probes", type=positive, default=None,
                   help="likelihood, hutchinson: probes averaged per step, 1..16 (default: 1)")
    p.add_argument("--probe", choices=["rademacher", "gaussian"], default=None,
                   help="likelihood, hutchinson: the probes' distribution (default: rademacher, the sign of host noise)")
    p.add_argument("--variant", choices=["bh1", "bh2"], default=None,
                   help="unipc: B(h) = h (bh1) or e^h - 1 (bh2) (default: bh2)")
    p.add_argument("--beta-min", type=float, default=0.1, help="VP-SDE beta(t) at t = 0")
    p.add_argument("--beta-max", type=float, default=20.0, help="VP-SDE beta(t) at t = 1")
    p.add_argument("--sampling-eps", type=float, default=1e-3, help="the last time of the reverse grid (t = eps)")
    p.add_argument("--sample-shape", type=shape_arg, default=None, help="C,H,W for a py: model that is a plain nn.Module")
    p.add_argument("--time-label-scale", type=float, default=999.0, metavar="S",
                   help="a network net(x, label) (py: plain nn.Module, diffusers:, unet-random) is fed label = S * t "
                        "for SDE time t in (0, 1] (score_sde's continuous VP models: 999; 1 for a network "
                        "that takes t itself)")
    p.add_argument("--value-range", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="data range of image samples, for PNG output (default: the model's, else none)")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="compute precision of the network inside the graphs; graph IO and the VP-SDE arithmetic "
                        "stay float32 (explicit casts: strongly typed for TensorRT). bf16 bundles run on TensorRT and, "
                        "on CPUs, on --backend openvino (ONNX Runtime's CPU provider has no bfloat16 kernels). int8: the network's convs "
                        "(but the first and last) in int8, calibrated on the model's own fp32 trajectories; for "
                        "CPUs with VNNI/AMX (see docs/cpu.md for speed and quality)")
    p.add_argument("--calibration-samples", type=int, default=None,
                   help="int8: number of fp32 trajectories the activation ranges are calibrated on (default: 16)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: 18; 22 for bf16)")
    p.add_argument("--force", action="store_true", help="replace an existing bundle directory")


def run(args: argparse.Namespace) -> None:
    try:
        from vpsde.export import VPSDE, export_bundle, load_model, steps_for_nfe
        from vpsde.export.bundle import default_std_formula
        from vpsde.export.sources import ModelSpecError
    except ImportError as e:
        raise UsageError(f"vpsde export needs torch and onnx ({e}); install them with pip install 'vpsde[export]' "
                         "after installing the torch build you want") from None
    if (args.out.exists() or args.out.is_symlink()) and not args.force:
        raise UsageError(f"{args.out} exists; pass --force to replace the bundle there")
    if args.steps and args.nfe:
        raise UsageError("give --steps or --nfe, not both")
    corrector = {k: v for k, v in (("snr", args.snr), ("corrector_steps", args.corrector_steps),
                                   ("coupling", args.coupling)) if v is not None}
    try:
        steps = (steps_for_nfe(args.sampler, args.nfe, args.corrector_steps or 1) if args.nfe
                 else args.steps or DEFAULT_STEPS.get(args.sampler, 1000))
        sde = VPSDE(args.beta_min, args.beta_max, args.sampling_eps,
                    std_formula=default_std_formula(args.sampler, args.grid))
        if not (args.time_label_scale > 0 and args.time_label_scale < float("inf")):
            raise ValueError(f"--time-label-scale: expected a positive number, got {args.time_label_scale}")
        model = load_model(args.model, sde, sample_shape=args.sample_shape, label_scale=args.time_label_scale)
        if args.sample_shape is not None and tuple(args.sample_shape) != tuple(model.sample_shape):  # was ignored
            raise ValueError(f"--sample-shape {','.join(map(str, args.sample_shape))}: --model {args.model!r} makes "
                             f"samples {list(model.sample_shape)}; --sample-shape is for a py: model that is a plain "
                             "nn.Module")
    except (ModelSpecError, ValueError) as e:
        raise UsageError(str(e)) from e
    value_range = args.value_range or getattr(model, "value_range", None)
    if value_range is None and len(model.sample_shape) == 3:
        value_range = (-1.0, 1.0)
    options = dict(corrector)
    if args.denoise_final:
        options["denoise_final"] = True
    options.update({k: v for k, v in (("order", args.order), ("variant", args.variant), ("divergence", args.divergence),
                                      ("probes", args.probes), ("probe", args.probe)) if v is not None})
    if args.tune_samples is not None or args.tune_seed is not None:
        if args.grid != "tuned":
            raise UsageError("--tune-samples and --tune-seed apply to --grid tuned")
        from vpsde.export.tuning import Tuning

        defaults = Tuning()
        options["tuning"] = Tuning(samples=args.tune_samples or defaults.samples,
                                   seed=defaults.seed if args.tune_seed is None else args.tune_seed)
    if args.calibration_samples is not None:
        if args.precision != "int8":
            raise UsageError("--calibration-samples applies to --precision int8")
        options["calibration_samples"] = args.calibration_samples
    try:
        export_bundle(model, args.out, sampler=args.sampler, steps=steps, grid=args.grid, sde=sde,
                      noise=noise_id(args.noise), opset=args.opset, value_range=value_range, source=args.model,
                      overwrite=args.force, precision=args.precision, **options)
    except (FileExistsError, ValueError) as e:
        raise UsageError(str(e)) from e
    print(args.out)
