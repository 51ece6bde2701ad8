"""``vpsde export | sample | inspect``: one command, subcommands, no tracebacks unless --verbose."""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from vpsde.runtime.errors import VpsdeError

SAMPLER_IDS = ("em", "pc", "ancestral", "ode-euler", "ode-heun", "dpmpp-2m", "inpaint")  # == export.samplers.SAMPLERS
DEFAULT_STEPS = {"ode-euler": 100, "ode-heun": 50, "dpmpp-2m": 20}

EXAMPLES = """examples:
  vpsde export --model gmm --steps 1000 --out build/gmm-em
  vpsde sample build/gmm-em --num 64 --seed 0 --out out/gmm
  vpsde inspect build/gmm-em
  vpsde build build/gmm-em --batch 1:16:64 --target-cc SM86      # TensorRT engines (TensorRT for RTX on CPU)
  vpsde sample build/gmm-em --backend tensorrt --cuda-graph       # on an NVIDIA GPU
  vpsde doctor                                                    # what this machine can run
  vpsde export --model digits --sampler dpmpp-2m --steps 20 --out build/digits-dpm20
  vpsde export --model digits --sampler inpaint --out build/digits-inpaint
  vpsde sample build/digits-inpaint --known digit.png --mask mask.png --num 16 --out out/inpaint
  vpsde sample build/digits-em1000 --num 100000 --ray ray://head:10001 --out out/digits-100k   # on a Ray cluster
"""

SAMPLER_HELP = ("em = Euler-Maruyama (diffusers' step_pred); pc = Langevin corrector + reverse-diffusion predictor "
                "(score_sde PC); ancestral = DDPM ancestral; ode-euler / ode-heun = probability-flow ODE (Heun: "
                "2 NFE per step); dpmpp-2m = DPM-Solver++(2M), the few-step sampler; inpaint = EM that re-imposes "
                "known pixels (sample with --known/--mask)")


DIGEST_HELP = ("refuse the bundle unless its digest (the sha256 of its SHA256SUMS, which covers the manifest and "
               "every graph; `vpsde inspect` prints it) is this one: pin the bundle you reviewed")


class UsageError(VpsdeError):
    """A bad command-line argument."""


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated sizes like 1,16,16, got {text!r}") from None
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return shape


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _threads(text: str) -> int:
    from vpsde.runtime.backends import MAX_THREADS

    value = _positive(text)
    if value > MAX_THREADS:
        raise argparse.ArgumentTypeError(f"expected 1..{MAX_THREADS}, got {value}")
    return value


def _u64(what: str):
    """An argparse type: an integer in [0, 2^64) (decimal or 0x hex), named ``what`` in its error."""
    def parse(text: str) -> int:
        try:
            value = int(text, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not 0 <= value < 2**64:
            raise argparse.ArgumentTypeError(f"expected 0 <= {what} < 2^64, got {value}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="vpsde", description="Deploy VP-SDE score-model samplers as ONNX bundles.",
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--verbose", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{export,sample,inspect,build,triton,serve,request,doctor}")

    p = sub.add_parser("export", help="export a score model + sampler step to a bundle (needs torch)",
                       formatter_class=fmt, description="Export the sampler step around a score model to ONNX "
                       "and write a bundle directory (graphs + manifest.json).")
    p.add_argument("--model", required=True,
                   help="model spec: digits (shipped) | weights:PATH.json | diffusers:DIR | "
                        "gmm[:dim=2,components=3,seed=0] | unet-random[:seed=0,channels=16] | py:package.module:factory")
    p.add_argument("--out", required=True, type=Path, help="bundle directory to write")
    p.add_argument("--sampler", default="em", choices=list(SAMPLER_IDS), help=SAMPLER_HELP)
    p.add_argument("--steps", type=_positive, default=None,
                   help="number of sampler steps N (default: 1000; ode-euler 100, ode-heun 50, dpmpp-2m 20)")
    p.add_argument("--nfe", type=_positive, default=None,
                   help="instead of --steps: the model-evaluation budget (pc: steps x (corrector steps + 1); "
                        "ode-heun: 2 per step)")
    p.add_argument("--grid", default=None, choices=["diffusers", "uniform", "logsnr"],
                   help="time grid (default: diffusers for em/pc/ancestral/inpaint, logsnr for the ODE samplers "
                        "and dpmpp-2m): diffusers = linspace(1, eps, N) with dt = -1/N (bit parity with diffusers, "
                        "score_sde's discrete betas); uniform = N equal steps from 1 to eps; logsnr = equal steps in "
                        "log(alpha/sigma)")
    p.add_argument("--snr", type=float, default=0.16, help="pc: Langevin corrector signal-to-noise ratio")
    p.add_argument("--corrector-steps", type=_positive, default=1, help="pc: Langevin steps before each predictor step")
    p.add_argument("--coupling", default="per-sample", choices=["per-sample", "batch"],
                   help="pc: Langevin step size from each sample's norms (per-sample: results independent of "
                        "batching) or from batch-averaged norms (batch: score_sde exactly)")
    p.add_argument("--noise", default="philox", choices=["philox", "torch"],
                   help="default noise generator recorded in the manifest (philox = portable spec)")
    p.add_argument("--denoise-final", action="store_true",
                   help="dpmpp-2m: make the last step the jump from t = eps to t = 0, so the sample is the model's "
                        "data prediction at eps (diffusers' final_sigmas_type='zero'); the other steps span 1..eps")
    p.add_argument("--beta-min", type=float, default=0.1)
    p.add_argument("--beta-max", type=float, default=20.0)
    p.add_argument("--sampling-eps", type=float, default=1e-3)
    p.add_argument("--sample-shape", type=_shape, default=None, help="C,H,W for a py: model that is a plain nn.Module")
    p.add_argument("--value-range", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="data range of image samples, for PNG output (default: the model's, else none)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="compute precision of the network inside the graphs; graph IO and the VP-SDE arithmetic "
                        "stay float32 (explicit casts: strongly typed for TensorRT). bf16 bundles run on TensorRT "
                        "only (ONNX Runtime's CPU provider has no bfloat16 kernels)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: 18; 22 for bf16)")
    p.add_argument("--force", action="store_true", help="replace an existing bundle directory")

    p = sub.add_parser("sample", help="draw samples from a bundle (no torch needed)", formatter_class=fmt,
                       description="Run the bundle's timestep loop and write samples.npz (+ grid.png for images).")
    p.add_argument("bundle", type=Path)
    p.add_argument("--expect-digest", default=None, metavar="SHA256", help=DIGEST_HELP)
    p.add_argument("--out", type=Path, default=Path("out"), help="output directory")
    p.add_argument("--num", type=_positive, default=64, help="number of samples")
    p.add_argument("--seed", type=_u64("seed"), default=0)
    p.add_argument("--batch-size", type=_positive, default=None, help="samples per graph call (default: all)")
    p.add_argument("--first-sample", type=_u64("index"), default=0,
                   help="global index of the first sample (for sharding: same seed, disjoint index ranges)")
    p.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "onnxruntime-trt", "tensorrt"],
                   help="onnxruntime (CPU, or its CUDA provider with --device cuda: needs onnxruntime-gpu); "
                        "onnxruntime-trt (ONNX Runtime's TensorRT execution provider, on the GPU); or tensorrt "
                        "(the engines `vpsde build` cached in the bundle; needs an NVIDIA GPU)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"],
                   help="where tensors live (default: cpu for onnxruntime, cuda for the others)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="GPU only: capture each graph binding once as a CUDA graph and replay it")
    p.add_argument("--threads", type=_threads, default=None, help="intra-op CPU threads, 1..1024 (default: all cores)")
    p.add_argument("--noise", default=None, choices=["philox", "torch"], help="override the manifest's generator")
    p.add_argument("--nan-guard", default="auto", choices=["auto", "step", "final", "off"],
                   help="NaN/Inf check: step = every graph output, naming the step (reads each output back: the "
                        "CPU default); final = the result only (the GPU default); off")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--known", type=Path, default=None,
                   help="inpainting bundles: known data, an image file (pixels 0..255 map to the model's value "
                        "range) or .npy [*sample_shape] / [num, *sample_shape] in the value range")
    p.add_argument("--mask", type=Path, default=None,
                   help="inpainting bundles: 1 where --known is kept; image (pixel > 127 = known) or .npy")
    g = p.add_argument_group("scale-out on Ray (needs vpsde[ray])",
                             "--ray writes OUT/shards/*.npy and OUT/index.json (read them with "
                             "vpsde.scale.load_samples); rerunning the same command resumes")
    g.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="shard the samples over Ray workers: alone, a local Ray instance; or a cluster address "
                        "(auto, HOST:PORT, ray://HOST:10001)")
    g.add_argument("--shard-size", type=_positive, default=1024, help="samples per shard file")
    g.add_argument("--workers", type=_positive, default=2, help="Ray actors, each with its own Sampler")
    g.add_argument("--worker-cpus", type=float, default=1.0, help="CPUs Ray reserves per worker")
    g.add_argument("--worker-gpus", type=float, default=0.0, help="GPUs Ray reserves per worker")

    p = sub.add_parser("build", help="build TensorRT engines for a bundle's graphs (cached in BUNDLE/engines)",
                       formatter_class=fmt, description="Build one TensorRT engine per graph with an optimization "
                       "profile over the batch, into the bundle's engine cache (keyed by graph sha256, TensorRT "
                       "flavour and version, target, precision and profile; valid engines are reused).")
    p.add_argument("bundle", type=Path)
    p.add_argument("--expect-digest", default=None, metavar="SHA256", help=DIGEST_HELP)
    p.add_argument("--batch", default="1:16:64", help="optimization profile over the batch: MIN:OPT:MAX (or one size)")
    p.add_argument("--opt-level", type=int, default=3, help="builder optimization level 0..5")
    p.add_argument("--target-cc", default=None,
                   help="TensorRT for RTX: compute capabilities to build for, e.g. SM86,SM89 (default: SM86); "
                        "full TensorRT builds for the GPU it runs on")
    p.add_argument("--trt-flavor", default="auto", choices=["auto", "tensorrt", "rtx"],
                   help="which TensorRT: auto prefers full TensorRT, or TensorRT for RTX when --target-cc is given")
    p.add_argument("--force", action="store_true", help="rebuild even when the cache holds a valid engine")

    p = sub.add_parser("triton", help="write a Triton Inference Server model repository serving a bundle",
                       formatter_class=fmt, description="Write REPO/NAME/config.pbtxt, REPO/NAME/1/model.py (Python "
                       "backend driving vpsde.runtime) and a digest-pinned copy of the bundle in REPO/NAME/1/bundle. "
                       "The Python that runs the model needs vpsde installed (pip install vpsde in the container).")
    p.add_argument("bundle", type=Path)
    p.add_argument("--out", type=Path, required=True, help="repository directory to write")
    _triton_options(p)
    p.add_argument("--force", action="store_true", help="replace a repository vpsde wrote")

    p = sub.add_parser("serve", help="serve a bundle on a local tritonserver (needs vpsde[serve])", formatter_class=fmt,
                       description="Write a model repository to a temporary directory, start tritonserver on it "
                       "(loopback unless --host), print the endpoints, and stop cleanly on Ctrl-C or SIGTERM.")
    p.add_argument("bundle", type=Path, nargs="?", help="the bundle to serve (or --repository)")
    p.add_argument("--repository", type=Path, default=None, help="serve this repository (from `vpsde triton`) as is")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--tritonserver", default=None, help="the tritonserver binary (default: nvidia-pytriton's, or PATH)")
    _triton_options(p)

    p = sub.add_parser("request", help="ask a served vpsde model for samples (tritonclient, HTTP or gRPC)",
                       formatter_class=fmt, description="Write samples.npz (+ grid.png) like `vpsde sample`, from a "
                       "server started by `vpsde serve` or any Triton serving a `vpsde triton` repository.")
    p.add_argument("url", help="HOST:PORT of the server's HTTP or gRPC endpoint")
    p.add_argument("--protocol", default="http", choices=["http", "grpc"])
    p.add_argument("--name", default="vpsde", help="model name")
    p.add_argument("--num", type=_positive, default=16)
    p.add_argument("--seed", type=_u64("seed"), default=0)
    p.add_argument("--first-sample", type=_u64("index"), default=0)
    p.add_argument("--value-range", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="write grid.png of image samples in this data range")
    p.add_argument("--out", type=Path, default=Path("out"), help="output directory")

    sub.add_parser("doctor", help="what this machine can run: ONNX Runtime providers, TensorRT, GPU, torch",
                   formatter_class=fmt)

    p = sub.add_parser("inspect", help="validate a bundle and print its manifest summary and cached engines",
                       formatter_class=fmt)
    p.add_argument("bundle", type=Path)
    p.add_argument("--expect-digest", default=None, metavar="SHA256", help=DIGEST_HELP)
    p.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    return parser


def _triton_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", default="vpsde", help="model name in the repository")
    p.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "onnxruntime-trt", "tensorrt"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where each model instance runs")
    p.add_argument("--max-batch", type=_positive, default=16,
                   help="requests Triton's dynamic batcher may hand the model at once (sampled together)")
    p.add_argument("--max-num", type=_positive, default=1024, help="most samples one request may ask for")
    p.add_argument("--max-rows", type=_positive, default=256, help="samples per graph batch across requests")
    p.add_argument("--instances", type=_positive, default=1, help="model instances, each with its own Sampler")
    p.add_argument("--threads", type=_threads, default=1,
                   help="intra-op CPU threads per instance (1: responses are bit-identical to a 1-thread in-process "
                        "Sampler under any load; scale with --instances)")


def _noise_id(name: str | None) -> str | None:
    from vpsde.runtime.noise import PHILOX_ID, TORCH_ID

    return {None: None, "philox": PHILOX_ID, "torch": TORCH_ID}[name]


def cmd_export(args: argparse.Namespace) -> None:
    try:
        from vpsde.export import VPSDE, export_bundle, load_model, steps_for_nfe
        from vpsde.export.bundle import default_std_formula
        from vpsde.export.sources import ModelSpecError
    except ImportError as e:
        raise UsageError(f"vpsde export needs torch and onnx ({e}); install them with pip install 'vpsde[export]' "
                         "after installing the torch build you want") from None
    if args.steps and args.nfe:
        raise UsageError("give --steps or --nfe, not both")
    steps = (steps_for_nfe(args.sampler, args.nfe, args.corrector_steps) if args.nfe
             else args.steps or DEFAULT_STEPS.get(args.sampler, 1000))
    try:
        sde = VPSDE(args.beta_min, args.beta_max, args.sampling_eps,
                    std_formula=default_std_formula(args.sampler, args.grid))
        model = load_model(args.model, sde, sample_shape=args.sample_shape)
    except (ModelSpecError, ValueError) as e:
        raise UsageError(str(e)) from e
    value_range = args.value_range or getattr(model, "value_range", None)
    if value_range is None and len(model.sample_shape) == 3:
        value_range = (-1.0, 1.0)
    options = {"snr": args.snr, "corrector_steps": args.corrector_steps, "coupling": args.coupling} \
        if args.sampler == "pc" else {}
    if args.denoise_final:
        options["denoise_final"] = True
    try:
        export_bundle(model, args.out, sampler=args.sampler, steps=steps, grid=args.grid, sde=sde,
                      noise=_noise_id(args.noise), opset=args.opset, value_range=value_range, source=args.model,
                      overwrite=args.force, precision=args.precision, **options)
    except (FileExistsError, ValueError) as e:
        raise UsageError(str(e)) from e
    print(args.out)


def cmd_sample(args: argparse.Namespace) -> None:
    import numpy as np

    from vpsde.runtime import Bundle, Sampler
    from vpsde.runtime.images import image_grid, save_npz, save_png

    if args.first_sample > 2**64 - args.num:
        raise UsageError(f"--first-sample {args.first_sample} + --num {args.num} passes the last sample index 2^64 - 1")
    bundle = Bundle.load(args.bundle, expect_digest=args.expect_digest)
    conditioning = _conditioning(args, bundle)
    _prepare_out_dir(args.out)  # before any graph call: a bad --out must not cost a sampling run
    if args.ray is not None:
        return _sample_on_ray(args, bundle, conditioning)
    sampler = Sampler(bundle, backend=args.backend, device=args.device, nan_guard=args.nan_guard,
                      progress=not args.no_progress, threads=args.threads, cuda_graph=args.cuda_graph)
    t0 = time.perf_counter()
    samples = sampler.sample(args.num, seed=args.seed, batch_size=args.batch_size, first_sample=args.first_sample,
                             generator=_noise_id(args.noise), conditioning=conditioning)
    elapsed = time.perf_counter() - t0
    m = bundle.manifest
    npz = args.out / "samples.npz"
    save_npz(npz, samples=samples, seed=np.uint64(args.seed), first_sample=np.uint64(args.first_sample),
             generator=np.str_(_noise_id(args.noise) or m.noise.generator), bundle=np.str_(str(args.bundle)),
             bundle_digest=np.str_(bundle.digest))
    print(f"sampled {args.num} x {m.model.sample_shape} in {elapsed:.2f} s "
          f"({m.sampler.steps} {m.sampler.name} steps, {sampler.device.name})")
    if m.sampler.params.get("coupling") == "batch" and args.batch_size and args.batch_size < args.num:
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
                           shard_size=args.shard_size, workers=args.workers, worker_cpus=args.worker_cpus,
                           worker_gpus=args.worker_gpus, address=None if args.ray == "local" else args.ray,
                           backend=args.backend, device=args.device, threads=args.threads,
                           batch_size=args.batch_size, generator=_noise_id(args.noise), conditioning=conditioning,
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


def _prepare_out_dir(out: Path) -> None:
    """Create ``out`` and prove it writable (a file is made and removed there), so that a bad --out fails
    before sampling, not after."""
    import tempfile

    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory; --out names the directory for samples.npz")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out, prefix=".vpsde-probe-"):
            pass
    except OSError as e:  # name --out, not the probe file
        raise OSError(e.errno, e.strerror, str(out)) from None


def _conditioning(args: argparse.Namespace, bundle) -> dict | None:
    """--known/--mask -> the conditioning arrays an inpainting bundle takes (clear errors otherwise)."""
    from vpsde.runtime.images import load_image, load_mask

    m = bundle.manifest
    wanted = set(m.sampler.conditioning)
    given = {k for k in ("known", "mask") if getattr(args, k) is not None}
    if not wanted:
        if given:
            raise UsageError(f"{args.bundle} ({m.sampler.name}) takes no --known/--mask; export with --sampler inpaint")
        return None
    if wanted != {"known", "mask"}:
        raise UsageError(f"{args.bundle}: conditioning inputs {sorted(wanted)} are not supported by this CLI")
    if given != wanted:
        raise UsageError(f"{args.bundle} is an inpainting bundle ({m.sampler.name}): pass --known and --mask")
    shape = tuple(m.model.sample_shape)
    value_range = tuple(m.model.value_range) if m.model.value_range else None
    return {"known": load_image(args.known, shape, value_range, "known data"), "mask": load_mask(args.mask, shape)}


def cmd_build(args: argparse.Namespace) -> None:
    from tqdm.auto import tqdm

    from vpsde.runtime import Bundle
    from vpsde.runtime.tensorrt.build import BatchProfile
    from vpsde.runtime.tensorrt.cache import build_cached
    from vpsde.runtime.tensorrt.flavor import load_flavor

    bundle = Bundle.load(args.bundle, expect_digest=args.expect_digest)
    profile = BatchProfile.parse(args.batch)
    flavor = load_flavor("rtx" if args.trt_flavor == "auto" and args.target_cc else args.trt_flavor)
    if flavor.targets_named_cc:
        targets = [t.strip().upper() for t in (args.target_cc or "SM86").split(",") if t.strip()]
    else:  # full TensorRT builds for this machine's GPU; the key records its compute capability
        targets = [t.strip().upper() for t in args.target_cc.split(",")] if args.target_cc \
            else flavor.compute_capabilities()
        flavor.set_targets(None, targets)  # a --target-cc other than this GPU: the "needs TensorRT for RTX" error
    print(f"TensorRT flavour {flavor.name} {flavor.version}, targets {','.join(targets)}, batch {profile}, "
          f"precision {bundle.manifest.model.precision}")
    for key in tqdm(list(bundle.manifest.graphs), desc="building engines", unit="graph", leave=False):
        engine = build_cached(bundle, key, flavor, profile, targets, args.opt_level, args.force,
                              log=lambda msg: print(msg, file=sys.stderr))
        state = f"built in {engine.seconds:.1f} s" if engine.built else "cached (valid, reused)"
        print(f"graph {key:<18} {engine.plan}  {state}")


def cmd_inspect(args: argparse.Namespace) -> None:
    from vpsde.runtime import Bundle

    bundle = Bundle.load(args.bundle, expect_digest=args.expect_digest)
    m = bundle.manifest
    if args.json:
        print(json.dumps({**m.to_dict(), "digest": bundle.digest}, indent=2))
        return
    print(_printable(_inspect_text(bundle)))
    _print_engines(bundle)


def _printable(text: str) -> str:
    """``text`` with control characters (other than newlines) escaped: a manifest's strings reach the terminal."""
    return "".join(ch if ch == "\n" or ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def _inspect_text(bundle) -> str:
    m = bundle.manifest
    lines = [f"bundle      {bundle.root}  (schema v{m.schema_version})",
             f"digest      {bundle.digest}  (sha256 of SHA256SUMS: manifest and graphs verified)"]
    lines.append(f"model       {m.model.name}  sample {m.model.sample_shape}  time label {m.model.time_label}  "
                 f"precision {m.model.precision}")
    lines.append(f"sde         VP beta [{m.sde.beta_min}, {m.sde.beta_max}]  eps {m.sde.sampling_eps}  std {m.sde.std_formula}")
    lines.append(f"sampler     {m.sampler.name}  {m.sampler.steps} steps  {m.sampler.grid} grid  final {m.sampler.final}")
    if m.sampler.params:
        lines.append(f"params      {', '.join(f'{k}={v}' for k, v in m.sampler.params.items())}")
    lines.append(f"program     {' -> '.join(f'{c.graph}x{c.repeat}' for c in m.sampler.program)}")
    lines.append(f"schedule    {', '.join(m.schedule)}")
    for st in m.sampler.state:
        lines.append(f"state       {st.input} <- {st.output} (init {st.init})")
    if m.sampler.conditioning:
        lines.append(f"condition   {', '.join(m.sampler.conditioning)}")
    lines.append(f"noise       {m.noise.generator}  inputs {m.noise.inputs or 'none (deterministic after the prior)'}")
    for key, g in m.graphs.items():
        io = lambda specs: ", ".join(f"{s.name}:{s.dtype}{s.shape}" for s in specs)  # noqa: E731
        lines.append(f"graph {key:<5} {g.file} opset {g.opset}\n  in  {io(g.inputs)}\n  out {io(g.outputs)}")
    lines.append(f"producer    {', '.join(f'{k} {v}' for k, v in m.producer.items())}")
    return "\n".join(lines)


def _print_engines(bundle) -> None:
    """The TensorRT engines cached in BUNDLE/engines, each with whether it still fits its graph and is intact."""
    from vpsde.runtime.tensorrt.cache import cached_keys, check_engine

    for graph, spec in bundle.manifest.graphs.items():
        for key, plan in cached_keys(bundle, graph):
            if key.graph_sha256 != spec.sha256 or key.precision != bundle.manifest.model.precision:
                state = "stale: built from another version of the graph"
            else:
                try:
                    check_engine(plan, key)
                    state = "ok"
                except VpsdeError as e:
                    state = f"unusable: {str(e).split(': ', 1)[-1]}"
            print(_printable(f"engine      {plan.name}  {key.flavor} {key.version}  {','.join(key.targets)}  "
                             f"batch {key.profile}  {state}"))


def _repository(args: argparse.Namespace, out: Path, force: bool) -> Path:
    from vpsde.runtime import Bundle
    from vpsde.serving.repository import write_repository

    bundle = Bundle.load(args.bundle, expect_digest=getattr(args, "expect_digest", None))
    try:
        return write_repository(bundle, out, name=args.name, backend=args.backend, device=args.device,
                                max_batch=args.max_batch, instances=args.instances, max_num=args.max_num,
                                max_rows=args.max_rows, threads=args.threads, force=force)
    except FileExistsError as e:
        raise UsageError(str(e)) from None


def cmd_triton(args: argparse.Namespace) -> None:
    repo = _repository(args, args.out, args.force)
    print(f"wrote {repo}: model {args.name!r} (config.pbtxt, 1/model.py, 1/bundle)")
    print(f"serve it: tritonserver --model-repository={repo.resolve()}  (the model's Python needs vpsde installed)")


def cmd_serve(args: argparse.Namespace) -> None:
    import tempfile

    from vpsde.serving.server import TritonServer, find_tritonserver

    if (args.bundle is None) == (args.repository is None):
        raise UsageError("give a BUNDLE or --repository REPO (one of them)")
    install = find_tritonserver(args.tritonserver)
    with tempfile.TemporaryDirectory(prefix="vpsde-serve-") as work:
        repo = args.repository or _repository(args, Path(work) / "repository", False)
        server = TritonServer(repo, install, args.http_port, args.grpc_port, host=args.host)
        try:
            server.wait_ready()
            print(f"serving {args.bundle or repo} as model {args.name!r}: HTTP {server.http_url}  gRPC {server.grpc_url}  "
                  f"(Ctrl-C to stop)", flush=True)
            while server.process.poll() is None:
                time.sleep(0.5)
            raise VpsdeError(f"tritonserver stopped by itself (exit {server.process.returncode}): {server.errors()}")
        finally:
            code = server.stop()
            print(f"tritonserver stopped (exit {code})", file=sys.stderr)


def cmd_request(args: argparse.Namespace) -> None:
    import numpy as np

    from vpsde.runtime.images import image_grid, save_npz, save_png
    from vpsde.serving.client import request_samples

    _prepare_out_dir(args.out)
    t0 = time.perf_counter()
    samples = request_samples(args.url, args.seed, args.num, args.first_sample, model=args.name,
                              protocol=args.protocol)
    elapsed = time.perf_counter() - t0
    npz = args.out / "samples.npz"
    save_npz(npz, samples=samples, seed=np.uint64(args.seed), first_sample=np.uint64(args.first_sample),
             server=np.str_(f"{args.protocol}://{args.url}/{args.name}"))
    print(f"received {args.num} x {list(samples.shape[1:])} from {args.url} in {elapsed:.2f} s")
    print(f"wrote {npz}")
    if args.value_range and samples.ndim == 4:
        png = args.out / "grid.png"
        save_png(png, image_grid(samples, tuple(args.value_range)))
        print(f"wrote {png}")


def cmd_doctor(args: argparse.Namespace) -> None:
    """What this machine can run: ONNX Runtime providers, TensorRT, cuda-python and the GPU, torch for export."""
    import importlib.metadata as md
    import platform

    def version(dist: str) -> str | None:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    print(f"vpsde       {version('vpsde') or 'not installed (running from source)'}  python {platform.python_version()}"
          f"  numpy {version('numpy')}")
    import onnxruntime as ort

    print(f"onnxruntime {ort.__version__}  providers {', '.join(ort.get_available_providers())}")
    from vpsde.runtime.errors import BackendUnavailable
    from vpsde.runtime.tensorrt.flavor import load_flavor

    try:
        flavor = load_flavor("auto")
        targets = ", ".join(flavor.compute_capabilities()) if flavor.targets_named_cc else "the GPU it runs on"
        print(f"tensorrt    {flavor.name} {flavor.version}  builds for {targets}")
    except BackendUnavailable as e:
        print(f"tensorrt    none: {e}")
    try:
        from vpsde.runtime.tensorrt.cuda import gpu_info

        gpu = gpu_info()
        print(f"gpu         {gpu.name} ({gpu.compute_capability}), cuda-bindings {version('cuda-bindings')}")
    except BackendUnavailable as e:
        print(f"gpu         none: {e}")
    torch = version("torch")
    print(f"export      torch {torch}, onnx {version('onnx')}" if torch else
          "export      torch not installed: `vpsde export` needs pip install 'vpsde[export]' after torch")


class Terminated(BaseException):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt, so that every temporary is removed."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


OS_HINTS = {errno.ENOSPC: "the disk is full: free space and run again (nothing half-written was left)",
            errno.EDQUOT: "the disk quota is exceeded: free space and run again (nothing half-written was left)",
            errno.EFBIG: "the file size limit was reached (nothing half-written was left)",
            errno.EROFS: "that file system is read-only: use a writable location (copy the bundle there)",
            errno.EACCES: "permission denied: use a location you can write, or fix its permissions",
            errno.EPERM: "not permitted: use a location you can write",
            errno.EISDIR: "a directory is in the way: choose another path",
            errno.ENOTDIR: "a file is in the way: choose another path"}


def _os_error_message(e: OSError) -> str:
    where = e.filename or "a file"
    hint = OS_HINTS.get(e.errno or 0)
    return f"{where}: {e.strerror or e}" + (f"; {hint}" if hint else "")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        {"export": cmd_export, "sample": cmd_sample, "inspect": cmd_inspect, "build": cmd_build,
         "triton": cmd_triton, "serve": cmd_serve, "request": cmd_request, "doctor": cmd_doctor}[args.command](args)
    except BrokenPipeError:  # `vpsde inspect | head`: the reader left; say nothing more
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass
        return 141
    except (VpsdeError, OSError, MemoryError) as e:
        if args.verbose:
            raise
        message = _os_error_message(e) if isinstance(e, OSError) and not isinstance(e, VpsdeError) else \
            "out of memory: use a smaller --num or --batch-size" if isinstance(e, MemoryError) else str(e)
        print(_printable(f"vpsde {args.command}: error: {message}"), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated", file=sys.stderr)
        return 143
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
