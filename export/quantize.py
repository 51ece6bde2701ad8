"""int8 step graphs for CPUs with VNNI / AMX: ONNX Runtime's static quantization of the score network's
convolutions, calibrated on the bundle's own trajectories.

What is quantized: every spatial (k x k, k > 1) ``Conv`` of the network except those that touch image space (input
or output channels equal to the sample's channels: the first and the last conv), as QDQ pairs (``QuantizeLinear`` /
``DequantizeLinear``, standard ONNX that ONNX Runtime fuses into int8 kernels and TensorRT reads as explicit
quantization): weights int8, symmetric, per output channel; activations uint8, per tensor, MinMax-calibrated.
Everything else stays float32: GroupNorm, attention, the time embedding, the VP-SDE arithmetic and the graph IO.
docs/cpu.md gives the measurements behind the choice of convs.

Calibration: the fp32 graphs run the manifest's program from the prior for ``samples`` samples (portable Philox
noise of ``CALIBRATION_SEED``, on ONNX Runtime's CPU provider), and the inputs of every graph call at
``CALIBRATION_STEPS`` steps spread evenly over the trajectory, plus its last ``FINAL_STEPS`` steps (where the
sample's detail is decided), are the calibration set of that graph.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from vpsde.runtime.bundle import Bundle

CALIBRATION_SEED = 20261125
CALIBRATION_STEPS = 32
FINAL_STEPS = 4
DEFAULT_CALIBRATION_SAMPLES = 16


def fp32_convs(model: onnx.ModelProto, channels: int) -> list[str]:
    """Names of the Conv nodes that stay float32: those whose weight reads or writes ``channels`` channels (the
    network's image-space convs), the pointwise (1 x 1) ones, and any whose weight is not a constant."""
    weights = {init.name: tuple(init.dims) for init in model.graph.initializer}
    names = []
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        dims = weights.get(node.input[1])
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if dims is None or channels in (dims[0], dims[1] * group) or all(k == 1 for k in dims[2:]):
            names.append(node.name)
    return names


def calibration_feeds(bundle: Bundle, samples: int = DEFAULT_CALIBRATION_SAMPLES, threads: int | None = None,
                      progress: Callable | None = None) -> dict[str, list[dict]]:
    """Per graph key, the feeds (``{input name: float32 array}``, batch ``samples``) of its calls at the
    calibration steps of a trajectory of ``bundle``'s program (its fp32 graphs, on ONNX Runtime's CPU provider)."""
    from vpsde.runtime.backends import open_backend
    from vpsde.runtime.noise import PHILOX_ID, make_noise
    from vpsde.runtime.program import HostTrajectory, Program

    manifest = bundle.manifest
    if manifest.sampler.conditioning:
        raise ValueError(f"int8 calibration runs the sampler unconditioned; {manifest.sampler.name!r} takes "
                         f"conditioning {list(manifest.sampler.conditioning)}")
    runners = open_backend("onnxruntime", bundle, "cpu", threads).runners
    steps = manifest.sampler.steps
    keep = set(np.linspace(0, steps - 1, min(CALIBRATION_STEPS, steps)).round().astype(int).tolist())
    keep |= set(range(max(0, steps - FINAL_STEPS), steps))
    noise = make_noise(PHILOX_ID, CALIBRATION_SEED)
    program, shape = Program.compile(manifest), tuple(manifest.model.sample_shape)
    traj = HostTrajectory(program, noise(0, 0, samples, shape))
    feeds: dict[str, list[dict]] = {key: [] for key in manifest.graphs}
    steps_done = progress(program.steps_to_run(), total=steps) if progress else program.steps_to_run()
    for i in steps_done:
        for call in program.calls:
            feed = traj.feed(i, call, {name: noise(index, 0, samples, shape) for name, index in program.draws(call, i)})
            if i in keep:
                feeds[call.graph].append({k: v.copy() for k, v in feed.items()})
            traj.advance(runners[call.graph].infer(feed))
    return feeds


def int8_convs(path: Path, sample_channels: int) -> tuple[list[str], list[str]]:
    """The graph's Conv nodes to quantize and those that stay float32; raises ValueError (naming the graph) if
    there is none to quantize, before any calibration is spent on it."""
    model = onnx.load(str(path))
    keep_fp32 = fp32_convs(model, sample_channels)
    convs = [n.name for n in model.graph.node if n.op_type == "Conv" and n.name not in keep_fp32]
    if not convs:
        raise ValueError(f"{path.name}: int8 quantizes the network's convolutions and this graph has "
                         f"{'only image-space or 1 x 1 ones' if keep_fp32 else 'none'}; export it in fp32")
    return convs, keep_fp32


def quantize_graph(src: Path, dst: Path, feeds: list[dict], sample_channels: int) -> int:
    """Write the int8 (QDQ) version of the graph ``src`` to ``dst``, calibrated on ``feeds``; returns the number of
    convs quantized. Raises ValueError if the graph has none to quantize."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    convs, keep_fp32 = int8_convs(src, sample_channels)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(feeds)

        def get_next(self) -> dict | None:
            return next(self.it, None)

    # the calibrator's augmented model goes to a temporary directory of ONNX Runtime's own, not into the bundle;
    # its advice to pre-process (symbolic shape inference) is for models without shapes: the exported ones have them
    root_log = logging.getLogger()
    level = root_log.level
    root_log.setLevel(logging.ERROR)
    try:
        quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=["Conv"], nodes_to_exclude=keep_fp32,
                        calibrate_method=CalibrationMethod.MinMax,
                        # not CalibMaxIntermediateOutputs: onnxruntime 1.32's MinMax calibrater drops each full
                        # chunk without merging its ranges (only the last chunk counted: 10% drift error at t = 1)
                        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
                        calibration_providers=["CPUExecutionProvider"])
    finally:
        root_log.setLevel(level)
    quantized = onnx.load(str(dst))
    onnx.checker.check_model(quantized, full_check=True)
    return len(convs)
