"""Export time with and without onnxscript's quadratic rewrite rules (``QUADRATIC_REWRITES`` in
``export/onnx_export.py``), side by side in one process, and whether every graph comes out byte-identical.

    .venv/bin/python bench/export_rewrites.py [--cases digits:likelihood digits:em unet-random:pc ...] [--json F]

A case is MODEL:SAMPLER (a ``vpsde export --model`` spec without colons of its own); each is exported twice in turn (which goes first alternates by case, after
one untimed warm-up export), with every rule (as torch.onnx alone does) and without the quadratic ones (what
vpsde does), into temporary bundles. Printed per case: seconds each way, the
ratio, and whether the graphs' sha256 agree (they must: the left-out rules only regroup slices).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from vpsde.export import VPSDE, export_bundle, load_model
from vpsde.export import onnx_export
from vpsde.runtime.bundle import sha256_file

DEFAULT_CASES = ("gmm:em", "digits:em", "digits:pc", "digits:dpmpp-2m", "unet-random:unipc",
                 "conv-random:likelihood", "unet-random:likelihood", "digits:likelihood")


def export_graphs(spec: str, sampler: str, out: Path, rules: tuple[str, ...]) -> tuple[float, dict[str, str]]:
    """Seconds to export, and {graph file: sha256}, with ``rules`` left out of onnxscript's rewriter."""
    onnx_export.QUADRATIC_REWRITES = rules
    steps = {"em": 20, "pc": 50, "likelihood": 4}.get(sampler, 10)
    t0 = time.perf_counter()
    bundle = export_bundle(load_model(spec, VPSDE()), out, sampler=sampler, steps=steps, log=lambda _: None)
    seconds = time.perf_counter() - t0
    return seconds, {p.name: sha256_file(p) for p in sorted(bundle.root.glob("*.onnx"))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", default=DEFAULT_CASES, metavar="MODEL:SAMPLER")
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args()
    left_out = onnx_export.QUADRATIC_REWRITES
    rows = []
    print(f"{'case':28} {'all rules s':>11} {'vpsde s':>9} {'ratio':>6}  graphs")
    with tempfile.TemporaryDirectory() as tmp:
        export_graphs("gmm", "em", Path(tmp) / "warm-up", left_out)  # imports and first-call costs, not timed
        for i, case in enumerate(args.cases):
            spec, _, sampler = case.rpartition(":")
            ways = [((), "all"), (left_out, "ours")]
            timed = {name: export_graphs(spec, sampler, Path(tmp) / f"{i}-{name}", rules)
                     for rules, name in (ways if i % 2 == 0 else ways[::-1])}  # alternate which goes first
            (all_s, all_sums), (ours_s, our_sums) = timed["all"], timed["ours"]
            same = all_sums == our_sums
            rows.append({"case": case, "all_rules_s": round(all_s, 2), "vpsde_s": round(ours_s, 2),
                         "ratio": round(all_s / ours_s, 2), "graphs": len(our_sums), "identical": same})
            print(f"{case:28} {all_s:11.1f} {ours_s:9.1f} {all_s / ours_s:5.2f}x  {len(our_sums)} "
                  f"{'identical' if same else 'DIFFER'}", flush=True)
    onnx_export.QUADRATIC_REWRITES = left_out
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    if not all(r["identical"] for r in rows):
        sys.exit("some graphs differ: the left-out rules changed a graph")


if __name__ == "__main__":
    main()
