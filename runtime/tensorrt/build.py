"""One ONNX graph -> one serialized TensorRT engine, with an optimization profile over the batch dimension.

Precision is not a builder flag: it lives in the graph (``export --precision``), and the network is built
strongly typed, as TensorRT 11 and TensorRT for RTX require.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vpsde.runtime.errors import BundleError, InputError
from vpsde.runtime.tensorrt.flavor import Flavor


@dataclass(frozen=True)
class BatchProfile:
    """The batch sizes an engine accepts: min <= opt <= max (opt is the size it is tuned for)."""

    min: int
    opt: int
    max: int

    @classmethod
    def parse(cls, text: str) -> "BatchProfile":
        """"MIN:OPT:MAX" (or one number N for N:N:N) -> a profile; InputError on anything else."""
        parts = text.split(":")
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise InputError(f"--batch: expected MIN:OPT:MAX such as 1:8:64 (or one size), got {text!r}") from None
        if len(values) == 1:
            values *= 3
        if len(values) != 3 or not 1 <= values[0] <= values[1] <= values[2]:
            raise InputError(f"--batch: expected 1 <= MIN <= OPT <= MAX, got {text!r}")
        return cls(*values)

    def __str__(self) -> str:
        return f"{self.min}:{self.opt}:{self.max}"


def build_engine(flavor: Flavor, onnx_bytes: bytes, onnx_path: Path, profile: BatchProfile, targets: list[str],
                 opt_level: int = 3, timing_cache: Path | None = None) -> bytes:
    """Parse the checked graph bytes ``onnx_bytes`` (``onnx_path`` names them in messages; the parser never opens a
    file, so no external data or symlink is followed) and build a serialized engine for ``targets``; the
    symbolic batch dimension of every input gets ``profile``. Parser errors raise :class:`BundleError` naming
    the file, node and operator."""
    trt = flavor.trt
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt, "NetworkDefinitionCreationFlag") and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        detail = "; ".join(f"node {e.node_name() or e.node()!r} ({e.node_operator() or '?'}): {e.desc()}" for e in errors)
        raise BundleError(f"{onnx_path}: {flavor.name} {flavor.version} cannot parse the graph: {detail}")
    config = builder.create_builder_config()
    if not 0 <= opt_level <= 5:
        raise InputError(f"--opt-level: expected 0..5, got {opt_level}")
    config.builder_optimization_level = opt_level
    flavor.set_targets(config, targets)
    opt_profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = list(tensor.shape)
        if not shape or shape[0] != -1 or any(d < 0 for d in shape[1:]):
            raise BundleError(f"{onnx_path}: input {tensor.name!r} has shape {shape}; expected a symbolic batch "
                              "dimension first and fixed sizes after it")
        opt_profile.set_shape(tensor.name, [profile.min, *shape[1:]], [profile.opt, *shape[1:]],
                              [profile.max, *shape[1:]])
    config.add_optimization_profile(opt_profile)
    cache = None
    if flavor.has_timing_cache:
        from vpsde.runtime.confine import read_regular

        old = read_regular(timing_cache, 1 << 30, "the timing cache") if timing_cache and timing_cache.exists() else b""
        cache = config.create_timing_cache(old)
        config.set_timing_cache(cache, False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BundleError(f"{onnx_path}: {flavor.name} {flavor.version} failed to build an engine "
                          f"(targets {', '.join(targets)}, batch {profile})")
    if cache is not None and timing_cache is not None:
        from vpsde.runtime.atomic import atomic_path

        with atomic_path(timing_cache) as tmp:
            tmp.write_bytes(bytes(memoryview(cache.serialize())))
    return bytes(memoryview(plan))
