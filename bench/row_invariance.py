"""Which nodes of a step graph make a row's bits depend on its batch: every intermediate value of the graph becomes
an output, the graph runs on ONNX Runtime's CPU provider once at --batch rows and once per row alone, and each node
whose output rows differ while its inputs' rows are equal is listed (the origins; what they feed differs too).
For a bundle that `vpsde serve` runs one batch per request ("continuous batching off": probe_row_invariance).

    python bench/row_invariance.py BUNDLE/em.onnx [--batch 8] [--threads 1]

Inputs are random, as bench/graph_profile.py draws them (its ``random_feed``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import shape_inference

sys.path.insert(0, str(Path(__file__).parent))
from graph_profile import random_feed  # noqa: E402


def row_variant_origins(path: Path, batch: int = 8, threads: int = 1, seed: int = 0) -> list[dict]:
    """[{"node", "op", "output", "shape", "max_abs"}] for each node whose output rows at ``batch`` differ from the
    same rows computed alone while its inputs' rows are equal, in graph order."""
    model = shape_inference.infer_shapes(onnx.load(str(path)))
    declared = {v.name: v for v in model.graph.value_info}
    exposed = {o.name for o in model.graph.output}
    for node in model.graph.node:
        for name in node.output:
            if name in declared and name not in exposed:
                model.graph.output.append(declared[name])
                exposed.add(name)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = random_feed(session, batch, seed)
    names = [o.name for o in session.get_outputs()]
    together = dict(zip(names, session.run(None, feed)))
    alone = [dict(zip(names, session.run(None, {k: v[i:i + 1] for k, v in feed.items()}))) for i in range(batch)]

    def rows_equal(name: str) -> bool:
        value = together.get(name, feed.get(name))
        if value is None or value.ndim == 0 or value.shape[0] != batch:
            return True  # a constant, or not batched
        rows = np.concatenate([a[name] if name in a else feed[name][i:i + 1] for i, a in enumerate(alone)])
        if rows.shape != value.shape:
            return True  # not one row per sample (a shape, or a value whose first axis happens to equal the batch)
        return np.array_equal(value, rows)

    origins = []
    for node in model.graph.node:
        for name in node.output:
            if name in together and not rows_equal(name) and all(rows_equal(i) for i in node.input if i):
                rows = np.concatenate([a[name] for a in alone])
                origins.append({"node": node.name, "op": node.op_type, "output": name,
                                "shape": list(together[name].shape),
                                "max_abs": float(np.abs(together[name] - rows).max())})
    return origins


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("graph", type=Path)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    origins = row_variant_origins(args.graph, args.batch, args.threads)
    if not origins:
        print(f"{args.graph}: every row at batch {args.batch} equals the row alone")
    for o in origins:
        print(f"{o['op']:<14} {o['node']:<24} -> {o['output']} {o['shape']}: max |d| {o['max_abs']:.3g}")


if __name__ == "__main__":
    main()
