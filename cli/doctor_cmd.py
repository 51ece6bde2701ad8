"""``vpsde doctor``: what this machine can run."""

from __future__ import annotations

import argparse
import os


def register(sub, fmt) -> None:
    """Add the subcommand to ``sub`` (argparse subparsers); ``fmt``: the help formatter."""
    sub.add_parser("doctor", help="what this machine can run: ONNX Runtime providers, TensorRT, GPU, torch",
                   description="Print the ONNX Runtime providers, the TensorRT flavour and its targets, the GPU "
                   "(or why there is none) and whether torch is there for export.",
                   formatter_class=fmt)


def run(args: argparse.Namespace) -> None:
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
    from vpsde.runtime.limits import cpu_limit, default_threads, memory_limit

    threads = default_threads() or "the runtime's own"
    print(f"host        {cpu_limit()} of {os.cpu_count()} CPUs usable (affinity, cgroup quota), default intra-op threads "
          f"{threads}; memory: {memory_limit() or 'unknown'}")
    import onnxruntime as ort

    print(f"onnxruntime {ort.__version__}  providers {', '.join(ort.get_available_providers())}")
    for provider in [p for p in ort.get_available_providers() if p in GPU_PROVIDERS]:
        print(f"            {provider}: {_starts(provider)}")
    openvino = version("openvino")
    print(f"openvino    {openvino}  (--backend openvino: CPU, runs bf16 bundles)" if openvino else
          "openvino    not installed: --backend openvino needs pip install 'vpsde[openvino]'")
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


GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def _starts(provider: str) -> str:
    """Whether ONNX Runtime's ``provider`` starts on a one-node graph (listed is not enough: see not_started)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from vpsde.runtime.backends.onnxruntime import not_started

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe", [x],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    providers = [provider, "CPUExecutionProvider"]
    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=providers)
    except Exception as e:  # noqa: BLE001 - onnxruntime's own exception types
        return f"cannot start: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}"
    if not_started(session, providers):
        return "listed, but cannot start (ONNX Runtime fell back to the CPU; its line above says why)"
    return "starts"
