"""Where a step graph's time goes on ONNX Runtime (CPU): node counts as exported and after ORT's own graph
optimisations, and the kernel time per operator type from ORT's profiler, per batch size.

    python bench/graph_profile.py build/digits-em1000/em.onnx --batch 1 64
    python bench/graph_profile.py a.onnx b.onnx --batch 1 64 --threads 1       # two graphs side by side

Per batch: ``--warmup`` untimed calls, then ``--calls`` profiled calls; the table gives each op type's share of the
summed kernel time (ORT's "Node" events) and µs per call, and the rate the convolutions reach (their multiply-adds
x 2 per sample, from the graph's shapes, over the Conv kernels' time: compare with the core's peak, e.g. 2 FMA
ports x 16 float32 lanes x 2 flops x the clock with AVX-512). Inputs are random (N(0, 1) for sample-shaped ones,
t in (0.01, 1), other per-sample scalars in (0.01, 0.1)); the graph's own numbers do not depend on them.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


def random_feed(session: ort.InferenceSession, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs for every graph input at ``batch`` (the symbolic dimension is the first)."""
    rng = np.random.default_rng(seed)
    feed = {}
    for i in session.get_inputs():
        shape = [batch if not isinstance(d, int) else d for d in i.shape]
        if len(shape) > 1:
            v = rng.standard_normal(shape)
        elif i.name in ("t", "t_next"):
            v = rng.uniform(0.01, 1.0, shape)
        else:
            v = rng.uniform(0.01, 0.1, shape) * (-1 if i.name == "dt" else 1)
        feed[i.name] = v.astype(NP_TYPES[i.type])
    return feed


def op_counts(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node)


def profile(path: Path, batch: int, threads: int, calls: int, warmup: int) -> tuple[dict[str, float], int]:
    """µs per call by op type over ``calls`` profiled calls, and the node count after ORT's optimisations."""
    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        so.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(tmp, "profile")
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        feed = random_feed(sess, batch)
        for _ in range(warmup + calls):
            sess.run(None, feed)
        events = json.loads(Path(sess.end_profiling()).read_text())
        optimized_nodes = len(onnx.load(so.optimized_model_filepath).graph.node)
    per_op: dict[str, float] = collections.defaultdict(float)
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    node_events = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    # keep the events of the last ``calls`` runs (the warm-up runs come first)
    first_timed = runs[-calls]["ts"] if len(runs) >= calls else 0
    for e in node_events:
        if e["ts"] >= first_timed:
            per_op[e["args"]["op_name"]] += e["dur"] / calls
    per_op["(whole call)"] = sum(e["dur"] for e in runs[-calls:]) / calls
    return dict(per_op), optimized_nodes


def conv_flops_per_sample(model: onnx.ModelProto) -> float:
    """Floating-point operations (2 per multiply-add) of the graph's Conv nodes for one sample, from the inferred
    shapes (the first dimension is the batch); QDQ convs count the same."""
    model = onnx.shape_inference.infer_shapes(model)
    dims = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*model.graph.value_info, *model.graph.output, *model.graph.input]}
    weights = {i.name: list(i.dims) for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    total = 0.0
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        w = weights.get(node.input[1])
        if w is None and node.input[1] in producers:  # QDQ: the weight is DequantizeLinear(int8 initializer)
            w = weights.get(producers[node.input[1]].input[0])
        out = dims.get(node.output[0])
        if w is None or not out or 0 in out[1:]:
            continue
        total += 2.0 * float(np.prod(w)) * float(np.prod(out[2:]))  # Cout x Cin/g x k x k, per output pixel
    return total


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("graphs", type=Path, nargs="+", help="ONNX step graphs")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--top", type=int, default=12, help="op types listed per graph and batch")
    args = p.parse_args(argv)
    print(f"onnxruntime {ort.__version__}, {args.threads} thread(s), {args.calls} profiled calls", file=sys.stderr)
    for path in args.graphs:
        model = onnx.load(str(path))
        counts = op_counts(model)
        flops = conv_flops_per_sample(model)
        print(f"\n{path}: {sum(counts.values())} nodes as exported: "
              + ", ".join(f"{k} {v}" for k, v in counts.most_common()))
        print(f"  convolutions: {flops / 1e9:.4f} GFLOP per sample")
        for batch in args.batch:
            per_op, optimized = profile(path, batch, args.threads, args.calls, args.warmup)
            whole = per_op.pop("(whole call)")
            kernels = sum(per_op.values())
            conv_us = sum(us for op, us in per_op.items() if "Conv" in op)
            rate = f", Conv kernels at {flops * batch / conv_us / 1e3:.1f} GFLOP/s" if conv_us else ""
            print(f"  batch {batch}: {whole:.0f} µs/call ({kernels:.0f} µs in kernels), {optimized} nodes after ORT"
                  + rate)
            for op, us in sorted(per_op.items(), key=lambda kv: -kv[1])[:args.top]:
                print(f"    {op:<28}{us:>10.1f} µs{100 * us / kernels:>7.1f}%")


if __name__ == "__main__":
    main()
