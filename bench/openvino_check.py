"""Does OpenVINO's CPU plugin compute a bundle's graphs as ONNX Runtime does? Per graph and batch size, one call
on fresh random inputs (sample-shaped ones N(0, 1), per-sample scalars in (0.1, 0.9)) through both, inference
precision pinned to f32; prints the largest difference per output and per sample. Needs `pip install openvino`
(not a vpsde dependency): the check behind docs/cpu.md's "OpenVINO" section.

    python bench/openvino_check.py BUNDLE [--batch 1 2 4 7]

With OpenVINO 2026.4.1 the Gaussian-mixture DPM-Solver++ graph (`vpsde export --model gmm:dim=3,components=2,seed=4
--sampler dpmpp-2m`) is right at batch 1 and wrong from batch 2 (x0 off by up to 11.6, differently per sample:
samples mix), with static shapes too; every output of it is right when all its intermediates are also graph
outputs (which blocks the plugin's fusions). The digits UNet EM graph agrees to float32 rounding (2e-5 on these
inputs, where dt is in (0.1, 0.9)).
"""

from __future__ import annotations

import argparse

import numpy as np
import onnxruntime as ort

from vpsde.runtime import Bundle


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 2, 4, 7])
    p.add_argument("--seed", type=int, default=None, help="input seed (default: fresh)")
    args = p.parse_args(argv)
    import openvino as ov

    bundle = Bundle.load(args.bundle)
    core = ov.Core()
    rng = np.random.default_rng(args.seed)
    print(f"onnxruntime {ort.__version__}, openvino {ov.__version__}")
    for key in bundle.manifest.graphs:
        data = bundle.graph_bytes(key)
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        compiled = core.compile_model(core.read_model(data), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        for batch in args.batch:
            feed = {}
            for i in session.get_inputs():
                shape = [batch if not isinstance(d, int) else d for d in i.shape]
                v = rng.standard_normal(shape) if len(shape) > 1 else rng.uniform(0.1, 0.9, shape)
                feed[i.name] = v.astype(np.float32)
            names = [o.name for o in session.get_outputs()]
            want = dict(zip(names, session.run(names, feed)))
            got = compiled.create_infer_request().infer(feed)
            for name in names:
                d = np.abs(np.asarray(got[name], np.float64) - want[name]).reshape(batch, -1).max(axis=1)
                print(f"{key:<20} batch {batch:>3}  {name:<10} max |d| {d.max():.3g}  per sample "
                      f"{np.array2string(d, precision=3, max_line_width=200)}")


if __name__ == "__main__":
    main()
