#!/usr/bin/env bash
# On a machine with an NVIDIA GPU and torch+CUDA: put onnxruntime-gpu in place of onnxruntime (from the wheels in
# WHEELS_DIR, or from the index when none is given; cuda-bindings and TensorRT wheels there are installed too),
# then run the GPU tests and the GPU loop benchmark (fp32 and fp16).
#   bash bench/gpu_run.sh [WHEELS_DIR]
# Not yet run on a GPU (no GPU was lent to the sessions that wrote it). On Hopper (H100/H200) only the ONNX Runtime
# loops can run: TensorRT for RTX does not target SM90, and full TensorRT is not on the public registries.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if [ $# -ge 1 ]; then src=(--no-index --find-links "$1"); else src=(); fi
$PY -m pip uninstall -y -q onnxruntime || true
$PY -m pip install -q "${src[@]}" onnxruntime-gpu
if [ $# -ge 1 ]; then
  for pkg in cuda-bindings tensorrt tensorrt-rtx-cu13-bindings; do
    if ls "$1" | grep -qi "^${pkg//-/_}-"; then $PY -m pip install -q "${src[@]}" "$pkg" || true; fi
  done
fi
$PY -m pip install -q --no-deps -e .
$PY -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"
$PY -m pytest -q -rs -s -m gpu tests/test_gpu.py tests/test_gpu_tensorrt.py || true
$PY bench/gpu_loop.py --steps 200 --batch 1,16,64
$PY bench/gpu_loop.py --steps 200 --batch 1,16,64 --precision fp16
