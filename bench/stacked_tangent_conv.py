"""Would one convolution over the primal and the tangent stacked on the batch beat two? A JVP graph holds, per
network convolution, conv(x, W, b) and conv(x_t, W): this times, on ONNX Runtime's CPU provider, a chain of such
pairs (with SiLU-like products between) written both ways: two Convs, or Concat -> one Conv -> Split -> Add(b).
Both graphs are checked to agree (float32 rounding), then timed in turn (ABBA), medians.

    python bench/stacked_tangent_conv.py --batch 1 4 64 --channels 64 --size 16 --pairs 20 --threads 2
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def chain(pairs: int, channels: int, size: int, stacked: bool, rng: np.random.Generator) -> onnx.ModelProto:
    """x, x_t float32 [B, C, S, S] -> the last pair's (primal, tangent) after ``pairs`` conv pairs."""
    weight = (rng.standard_normal((channels, channels, 3, 3)) * 0.05).astype(np.float32)
    bias = rng.standard_normal(channels).astype(np.float32)
    inits = [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "b"),
             numpy_helper.from_array(bias.reshape(1, channels, 1, 1), "b4")]
    nodes, x, xt = [], "x", "xt"
    for i in range(pairs):
        if stacked:
            nodes += [helper.make_node("Concat", [x, xt], [f"c{i}"], axis=0),
                      helper.make_node("Conv", [f"c{i}", "W"], [f"o{i}"], pads=[1, 1, 1, 1]),
                      helper.make_node("Split", [f"o{i}"], [f"q{i}", f"t{i}"], axis=0, num_outputs=2),
                      helper.make_node("Add", [f"q{i}", "b4"], [f"p{i}"])]
        else:
            nodes += [helper.make_node("Conv", [x, "W", "b"], [f"p{i}"], pads=[1, 1, 1, 1]),
                      helper.make_node("Conv", [xt, "W"], [f"t{i}"], pads=[1, 1, 1, 1])]
        nodes += [helper.make_node("Sigmoid", [f"p{i}"], [f"s{i}"]),
                  helper.make_node("Mul", [f"p{i}", f"s{i}"], [f"x{i}"]),
                  helper.make_node("Mul", [f"t{i}", f"s{i}"], [f"xt{i}"])]
        x, xt = f"x{i}", f"xt{i}"
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["B", channels, size, size]) for n in ("x", "xt")]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in (x, xt)]
    graph = helper.make_graph(nodes, "pairs", io, outs, inits if stacked else inits[:2])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4, 64])
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--pairs", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=12)
    args = p.parse_args()
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    sessions = {name: ort.InferenceSession(chain(args.pairs, args.channels, args.size, stacked,
                                                 np.random.default_rng(0)).SerializeToString(),
                                           options, providers=["CPUExecutionProvider"])
                for name, stacked in (("two convs", False), ("stacked", True))}
    rng = np.random.default_rng(1)
    print(f"onnxruntime {ort.__version__}, {args.threads} thread(s), {args.pairs} pairs of {args.channels}-channel "
          f"3x3 convolutions on {args.size}x{args.size}")
    for batch in args.batch:
        feed = {n: rng.standard_normal((batch, args.channels, args.size, args.size)).astype(np.float32)
                for n in ("x", "xt")}
        a, b = (s.run(None, feed) for s in sessions.values())
        diff = max(float(np.abs(u - v).max() / (np.abs(u).max() + 1e-30)) for u, v in zip(a, b))
        times = {name: [] for name in sessions}
        for r in range(args.repeats):
            for name in (list(sessions) if r % 2 == 0 else list(reversed(sessions))):
                t0 = time.perf_counter()
                sessions[name].run(None, feed)
                times[name].append(time.perf_counter() - t0)
        two, stacked = (1e3 * float(np.median(t)) for t in times.values())
        print(f"batch {batch:3d}: two convs {two:8.2f} ms, stacked {stacked:8.2f} ms, two / stacked {two / stacked:.2f}"
              f" (outputs agree to {diff:.1e} relative)")


if __name__ == "__main__":
    main()
