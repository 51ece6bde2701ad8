"""``vpsde parity``: a bundle's whole trajectory on one or more backends against a reference, per step and per
graph call (see ``verify/parity.py``)."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from vpsde.cli.common import (UsageError, add_expect_digest, backend_list, positive, prepare_out_dir, report_not_run,
                              threads_arg, u64)
from vpsde.cli.conditioning import add_conditioning_args, conditioning_from_args
from vpsde.runtime.errors import VpsdeError

EPILOG = """references (--against):
  eager            the bundle's step modules in eager torch, float32 (needs vpsde[export]) around the model
                   of --model, whose weights must match the manifest's model.weights_sha256; without
                   --model only a self-contained model.source (digits, gmm) is rebuilt: a bundle never
                   chooses code to run or files to read
  eager64          the same in float64 arithmetic (values between calls stay float32, as in the graphs)
  backend:NAME     this bundle on another backend (onnxruntime, onnxruntime-trt, tensorrt)
  PATH             another bundle of the same program (e.g. the fp32 sibling of an fp16 bundle)

tolerances: a graph call passes under polygraphy's elementwise rule per output (each element within its
output's --call-atol or --call-rtol); the final sample passes if max |a - b| <= --atol or its relative L2 <=
--rtol. --call-atol/--call-rtol take a number (every output) or NAME:VALUE items, polygraphy's convention
(--call-atol x0:1e-3 1e-5: x0 at 1e-3, every other output at 1e-5). Defaults by the lower precision of the two
sides (docs/parity.md says why; x0 is DPM-Solver++'s data prediction, which scales rounding by 1/alpha(t)):
{table}
Each call's atol per output is max(its bar, the default ("") bar x the call's gain), the gain being
max |d output / d eps| measured in eager torch: a coarse step multiplies the network's rounding by it. An output
past its bar is re-judged: it passes if the sides differ by at most {margin:g}x the call's float32 rounding
spread, how far apart the eager call's float32 - float64 errors lie on its inputs and on {runs} copies moved by
one ulp (wide where the call is ill-conditioned, narrow where float32 errs the same way everywhere); against
eager64, where only the test side errs as float32 does, each element's bar also takes the eager float32 call's
own error on those inputs. A bar of 0 asks for equality: none of these widens it.
Against another backend or bundle the eager model measures both too where torch is installed and the model is
at hand (--model, or a self-contained model.source); otherwise, or with --no-gains, the bars are the table's
alone.
A --backends side that cannot open (not installed here, or refused by OpenVINO's open check) gets a line saying
why, under the others' rows. Exit status 1 when a comparison fails or a side was not run, 2 on an error (no side
opened, a bad argument).

examples:
  vpsde parity build/digits-em --against eager --num 4 --report out/parity
  vpsde parity build/digits-em-fp16 --against build/digits-em --report out/fp16
  vpsde parity build/digits-em --against eager --backends onnxruntime,tensorrt      # on an NVIDIA GPU
  vpsde parity build/digits-em --against eager --report out/p --polygraphy-cmd      # one call, for polygraphy run
"""


def tolerance_arg(text: str) -> tuple[str, float]:
    """One --call-atol/--call-rtol item: VALUE (every output) or NAME:VALUE; VALUE finite and >= 0."""
    name, sep, value = text.rpartition(":")
    try:
        bar = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected VALUE or OUTPUT:VALUE with a number, got {text!r}") from None
    if not (bar >= 0 and bar != float("inf")):
        raise argparse.ArgumentTypeError(f"expected a finite tolerance >= 0, got {text!r}")
    if sep and not name:
        raise argparse.ArgumentTypeError(f"expected OUTPUT:VALUE with an output name, got {text!r}")
    return name, bar


def finite_tolerance(text: str) -> float:
    name, bar = tolerance_arg(text)
    if name:
        raise argparse.ArgumentTypeError(f"the final-sample tolerance is one number, got {text!r} (per-output bars "
                                         "are --call-atol/--call-rtol)")
    return bar


def register(sub, fmt) -> None:
    from vpsde.verify.tolerances import SPREAD_MARGIN, SPREAD_RUNS, tolerance_help

    p = sub.add_parser("parity", help="compare a bundle's trajectory across backends, precisions or eager torch",
                       description="Run a bundle's sampler on each --backends side and on a reference with the same "
                       "seeds and host noise; compare every graph call (the test side fed the reference's inputs) "
                       "and the two free-running trajectories step by step; print a table and exit 1 past the "
                       "tolerances.", epilog=EPILOG.format(table=tolerance_help(), margin=SPREAD_MARGIN, runs=SPREAD_RUNS),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", type=Path, help="bundle directory (the side under test)")
    p.add_argument("--against", required=True, metavar="REF", help="eager | eager64 | backend:NAME | PATH (below)")
    p.add_argument("--backends", default="onnxruntime", help="comma-separated backends to test (default: onnxruntime)")
    p.add_argument("--device", default=None, help="cpu | cuda for the onnxruntime sides (default: each backend's)")
    p.add_argument("--model", default=None, help="the eager model (the eager references; the gain meter for "
                   "the others), a spec as for export (default: the manifest's model.source if it is digits or gmm)")
    p.add_argument("--num", type=positive, default=4, help="samples (one batch; default: 4)")
    p.add_argument("--seed", type=u64("--seed"), default=0, help="noise seed (default: 0)")
    p.add_argument("--threads", type=threads_arg, default=None, help="intra-op CPU threads of ONNX Runtime")
    for flag, what in (("--atol", "final sample: max |a - b|"), ("--rtol", "final sample: relative L2")):
        p.add_argument(flag, type=finite_tolerance, default=None, help=f"{what} tolerance (default: by precision, below)")
    for flag, what in (("--call-atol", "absolute"), ("--call-rtol", "relative")):
        p.add_argument(flag, type=tolerance_arg, nargs="+", default=None, metavar="[OUTPUT:]VALUE",
                       help=f"per graph call: elementwise {what} tolerance, per output (default: by precision, below)")
    p.add_argument("--report", type=Path, default=None, metavar="DIR",
                   help="write report.json, error_vs_step.png and (image bundles) samples.png here")
    p.add_argument("--polygraphy-cmd", action="store_true",
                   help="save the first failing call's inputs (else the first call's) to DIR/polygraphy_inputs.json "
                        "and print the `polygraphy run` line that compares that one call across ONNX Runtime and "
                        "TensorRT (needs --report)")
    p.add_argument("--quality", action="store_true",
                   help="also score both sides' final samples with the model's yardstick (the shipped digits "
                        "model: classifier Fréchet distance and confidence; gmm: the exact-truth figures); use "
                        "--num 200 or more for figures that mean something (needs vpsde[export]; sampling "
                        "bundles only)")
    p.add_argument("--no-gains", action="store_true",
                   help="per-call bars from the table alone: no gain or rounding spread measured (saves an "
                        "eager network call per graph call against another backend or bundle; a few-step bundle "
                        "may then FAIL on rounding its steps amplify)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_conditioning_args(p)
    add_expect_digest(p)


def _reference(args, bundle):
    from vpsde.runtime import Bundle
    from vpsde.verify.parity import BackendSide

    ref = args.against
    if ref in ("eager", "eager64"):
        try:
            import torch

            from vpsde.export.eager import EagerSide
        except ImportError:
            raise UsageError("--against eager needs torch: pip install 'vpsde[export]'") from None
        return EagerSide(bundle, args.model, torch.float64 if ref == "eager64" else torch.float32), bundle.manifest
    if ref.startswith("backend:"):
        backend = ref.removeprefix("backend:")
        return BackendSide(bundle, backend, None, args.threads, name=f"{backend} (reference)"), bundle.manifest
    other = Bundle.load(Path(ref))
    _check_same_program(bundle, other)
    return BackendSide(other, "onnxruntime", args.device, args.threads,
                       name=f"{other.root.name} onnxruntime[{other.manifest.model.precision}]"), other.manifest


def _gain_meter(args, bundle):
    """For a backend or bundle reference: the eager side that measures each call's gain, or None (with a line
    saying so) where torch or the model is not at hand. A --model the bundle does not hold is an error."""
    try:
        from vpsde.export.eager import EagerSide
        from vpsde.export.sources import self_contained
    except ImportError:
        print("per-call bars: the table's (measuring the steps' gains needs torch: pip install 'vpsde[export]')")
        return None
    if args.model is None and not self_contained(bundle.manifest.model.source):
        print("per-call bars: the table's (no eager model to measure the steps' gains: name it with --model)")
        return None
    return EagerSide(bundle, args.model)


def _check_same_program(bundle, other) -> None:
    """Two bundles compare only if they run the same program on the same schedule and noise."""
    a, b = bundle.manifest, other.manifest
    fields = {"sampler.steps": lambda m: m.sampler.steps, "sampler.program": lambda m: m.sampler.program,
              "sampler.final": lambda m: m.sampler.final, "sampler.state": lambda m: m.sampler.state,
              "sampler.conditioning": lambda m: m.sampler.conditioning, "schedule": lambda m: m.schedule,
              "noise.inputs": lambda m: m.noise.inputs, "model.sample_shape": lambda m: m.model.sample_shape}
    for name, get in fields.items():
        if get(a) != get(b):
            raise UsageError(f"{other.root / 'manifest.json'}: field {name} differs from {bundle.root / 'manifest.json'}'s; "
                             "only bundles of the same sampler program and schedule can be compared")


def run(args: argparse.Namespace) -> int:
    from vpsde.runtime import Bundle
    from vpsde.verify.parity import BackendSide, compare
    from vpsde.verify.tolerances import lower_precision

    backends = backend_list(args.backends, "--backends")
    if args.polygraphy_cmd and args.report is None:
        raise UsageError("--polygraphy-cmd saves the call's inputs under --report DIR: give --report")
    bundle = Bundle.load(args.bundle, expect_digest=args.expect_digest)
    m = bundle.manifest
    if args.report is not None:  # before the comparison: a bad --report must not cost the run
        prepare_out_dir(args.report, "report.json", "--report")
    if args.quality and m.sampler.task != "sample":
        raise UsageError(f"--quality scores sampled outputs; {bundle.root} is a {m.sampler.task} bundle "
                         "(sampler.task), whose output is log p: `vpsde likelihood` reports its figures")
    yardstick = _yardstick(bundle) if args.quality else None
    conditioning = conditioning_from_args(args, bundle)
    reference, ref_manifest = _reference(args, bundle)
    meter = None if args.no_gains or hasattr(reference, "gains") else _gain_meter(args, bundle)
    precision = lower_precision(m.model.precision, ref_manifest.model.precision)
    reports, not_run = [], {}
    for backend in backends:
        try:
            test = BackendSide(bundle, backend, args.device, args.threads)
        except VpsdeError as e:  # not installed here, or refused by its open check: the others are still compared
            not_run[backend] = e
            continue
        report = compare(m, reference, test, args.num, args.seed, atol=args.atol, rtol=args.rtol,
                         call_atol=_bars(args.call_atol), call_rtol=_bars(args.call_rtol), precision=precision,
                         progress=not args.no_progress, gain_meter=meter, gains=not args.no_gains,
                         conditioning=conditioning)
        reports.append(report)
    if not reports:  # no backend opened: the first one's error is the command's
        raise next(iter(not_run.values()))
    _print_table(m, reports)
    status = report_not_run(not_run)
    quality = _quality(m, yardstick, reports, args.num) if args.quality else None
    if args.report is not None:
        from vpsde.verify.report import write_report

        extra = {"bundle": str(bundle.root), "digest": bundle.digest, "against": args.against, "precision": precision,
                 "quality": quality, "not_run": {b: str(e) for b, e in not_run.items()}}
        for path in write_report(reports, args.report, m.model.value_range, extra):
            print(f"wrote {path}", file=sys.stderr)
        if args.polygraphy_cmd:
            print(_polygraphy_cmd(bundle, reports[0], args.report))
    return 0 if all(r.passed for r in reports) and status is None else 1


def _bars(items: list[tuple[str, float]] | None) -> float | dict[str, float] | None:
    """--call-atol/--call-rtol items -> one bar for every output (a lone VALUE), or {output: bar} applied over the
    defaults ("" for a VALUE among NAME:VALUE items: every output not named)."""
    if items is None:
        return None
    return items[0][1] if len(items) == 1 and not items[0][0] else dict(items)


def _bar_text(bars: dict[str, float], outputs: list[str]) -> str:
    from vpsde.verify.tolerances import bar_for

    return "/".join(f"{bar_for(bars, o):.3g}" for o in outputs)


def _yardstick(bundle):
    """The bundle's quality yardstick (export/quality.py), built before the comparison runs; None: there is none."""
    try:
        from vpsde.export.quality import quality_yardstick
    except ImportError:
        raise UsageError("--quality needs torch: pip install 'vpsde[export]'") from None
    return quality_yardstick(bundle)


def _quality(m, score, reports, num: int) -> dict:
    """Both sides' final samples scored by the model's yardstick ``score`` (printed; returned for report.json)."""
    if score is None:
        print(f"quality: no yardstick for model {m.model.name!r} (the shipped digits model and gmm have one)")
        return {}
    if num < 200:
        print(f"quality: only {num} samples per side: the figures below are mostly sampling noise (use --num 200+)")
    out = {reports[0].reference: score(reports[0].reference_sample)}
    for r in reports:
        out[r.test] = score(r.test_sample)
    names = list(next(iter(out.values())))
    print(f"{'quality':<28}" + "".join(f"{n:>18}" for n in names))
    for side, figures in out.items():
        print(f"{side[:27]:<28}" + "".join(f"{figures[n]:>18.4g}" for n in names))
    return out


def _print_table(m, reports) -> None:
    from vpsde.verify.parity import call_bars
    from vpsde.verify.tolerances import SPREAD_MARGIN

    print(f"{m.sampler.name}, {m.sampler.steps} steps, {reports[0].num} samples, seed {reports[0].seed}; "
          f"reference: {reports[0].reference}")
    print(f"{'test side':<28}{'final max|d|':>13}{'final relL2':>12}{'worst step relL2':>18}{'call atol req':>15}"
          f"{'call rtol req':>15}  result")
    for r in reports:
        worst = max(r.steps, key=lambda s: s.rel_l2)
        first = r.first_failing_call
        if r.passed:
            verdict = "ok"
        elif first is not None:
            outs = first.failed_outputs
            atol = call_bars(r.call_atol, first.gain, first.max_abs)  # this call's, its gain applied
            verdict = (f"FAIL: call at step {first.step} ({first.graph}), output {'/'.join(outs)}: max |d| "
                       f"{'/'.join(f'{first.max_abs[o]:.3g}' for o in outs)} past atol {_bar_text(atol, outs)}"
                       f" and rtol {_bar_text(r.call_rtol, outs)}{_spread_text(first, outs)}")
        else:
            verdict = f"FAIL: final sample past atol {r.atol:g} / rtol {r.rtol:g}"
        print(f"{r.test:<28}{r.final_max_abs:>13.3g}{r.final_rel_l2:>12.3g}{worst.rel_l2:>11.3g} @{worst.step:<5}"
              f"{r.required_call_atol:>15.3g}{r.required_call_rtol:>15.3g}  {verdict}")
    for r in reports:
        judged = [(c, k) for c, k in r.spread_judged if k not in c.failed_outputs]
        if judged:
            c, k = max(judged, key=lambda ck: ck[0].max_abs[ck[1]] / ck[0].rejudged_atol(ck[1]))
            carried = any(c.float32_error for c, _ in judged)
            print(f"{r.test}: {len(judged)} call output(s) past the bar passed within {SPREAD_MARGIN:g}x their float32 "
                  f"rounding spread{_CARRIED if carried else ''}; closest: step {c.step} ({c.graph}) {k}, max |d| "
                  f"{c.max_abs[k]:.3g}, spread {c.spread[k]:.3g}"
                  + (f", eager float32's error {c.float32_error[k]:.3g}" if k in c.float32_error else ""))


_CARRIED = " plus eager float32's own error (the reference computes in float64)"


def _spread_text(call, outputs: list[str]) -> str:
    """Where the failing outputs were re-judged by their rounding spread: the atol that gave them."""
    from vpsde.verify.tolerances import SPREAD_MARGIN

    judged = [o for o in outputs if o in call.spread]
    if not judged:
        return ""
    return (f" (nor {'/'.join(f'{call.rejudged_atol(o):.3g}' for o in judged)}, {SPREAD_MARGIN:g}x the float32 "
            f"rounding spread{_CARRIED if any(o in call.float32_error for o in judged) else ''})")


def _polygraphy_cmd(bundle, report, out: Path) -> str:
    """Save the captured call's feed in polygraphy's input format and return the `polygraphy run` line."""
    from polygraphy.json import save_json

    from vpsde.runtime.atomic import atomic_path

    step, key, feed = report.captured
    path = out / "polygraphy_inputs.json"
    with atomic_path(path, suffix=".json") as tmp:
        save_json([feed], str(tmp), description=f"vpsde parity: inputs of graph {key!r} at step {step}")
    graph = bundle.graph_path(key)
    shapes = " ".join(f"{name}:{list(v.shape)}".replace(" ", "") for name, v in feed.items())
    return (f"# graph {key!r} at step {step}: ONNX Runtime vs TensorRT on the same inputs\n"
            f"polygraphy run {shlex.quote(str(graph))} --onnxrt --trt --load-inputs {shlex.quote(str(path))} "
            f"--input-shapes {shapes} --check-error-stat elemwise --atol {_polygraphy_bars(report.call_atol)} "
            f"--rtol {_polygraphy_bars(report.call_rtol)}")


def _polygraphy_bars(bars: dict[str, float]) -> str:
    """Per-output bars in polygraphy's command-line form: NAME:VALUE items, then the bare default."""
    return " ".join([f"{k}:{v:g}" for k, v in bars.items() if k] + [f"{bars['']:g}"])
