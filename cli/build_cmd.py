"""``vpsde build``: TensorRT engines for a bundle's graphs, into its engine cache."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vpsde.cli.common import add_expect_digest


def register(sub, fmt) -> None:
    """Add the subcommand to ``sub`` (argparse subparsers); ``fmt``: the help formatter."""
    p = sub.add_parser("build", help="build TensorRT engines for a bundle's graphs (cached in BUNDLE/engines)",
                       formatter_class=fmt, description="Build one TensorRT engine per graph with an optimization "
                       "profile over the batch, into the bundle's engine cache (keyed by graph sha256, TensorRT "
                       "flavour and version, target, precision and profile; valid engines are reused).")
    p.add_argument("bundle", type=Path, help="bundle directory (its engines go to BUNDLE/engines)")
    add_expect_digest(p)
    p.add_argument("--batch", default="1:16:64", help="optimization profile over the batch: MIN:OPT:MAX (or one size)")
    p.add_argument("--opt-level", type=int, default=3, help="builder optimization level 0..5")
    p.add_argument("--target-cc", default=None,
                   help="TensorRT for RTX: compute capabilities to build for, e.g. SM86,SM89 (default: SM86); "
                        "full TensorRT builds for the GPU it runs on")
    p.add_argument("--trt-flavor", default="auto", choices=["auto", "tensorrt", "rtx"],
                   help="which TensorRT: auto prefers full TensorRT, or TensorRT for RTX when --target-cc is given")
    p.add_argument("--force", action="store_true", help="rebuild even when the cache holds a valid engine")


def run(args: argparse.Namespace) -> None:
    from vpsde.runtime import Bundle
    from vpsde.runtime.progress import tracked
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
    keys = list(bundle.manifest.graphs)
    for key in tracked(keys, len(keys), "building engines", "graph"):
        engine = build_cached(bundle, key, flavor, profile, targets, args.opt_level, args.force,
                              log=lambda msg: print(msg, file=sys.stderr))
        state = f"built in {engine.seconds:.1f} s" if engine.built else "cached (valid, reused)"
        print(f"graph {key:<18} {engine.plan}  {state}")
