# Set-up and the two jobs README.md opens with. Everything lands in .venv; nothing is pulled from a model hub.
# TORCH is installed first and on its own so that nothing later pulls a multi-GB CUDA build onto a CPU machine;
# override it for your platform, e.g. make demo TORCH="torch==2.5.1" (with pip pointed at the index you use).
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
# Serving (Triton): nvidia-pytriton's tritonserver and its Python backend need numpy<2, so the model's Python is
# an environment of its own: the runtime and vpsde[serve], no torch.
SERVE_VENV := .venv-serve
BUNDLE := build/digits-em1000
OUT := out/digits

.PHONY: install demo test test-quick bench bench-cifar bench-ray bench-serve gpu-pack clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test,tensorrt-rtx,ray,openvino]"
	touch $@

$(SERVE_VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/python -m pip install -q --upgrade pip
	$(SERVE_VENV)/bin/python -m pip install -q -e ".[serve]"
	touch $@

install: $(VENV)/.installed $(SERVE_VENV)/.installed

# Export the shipped digits model with the 1000-step Euler-Maruyama sampler, sample 64 digits on
# ONNX Runtime (CPU), write a PNG grid and an .npz.
demo: $(VENV)/.installed
	$(BIN)/vpsde export --model digits --steps 1000 --out $(BUNDLE) --force
	$(BIN)/vpsde inspect $(BUNDLE)
	$(BIN)/vpsde sample $(BUNDLE) --num 64 --seed 0 --out $(OUT)

# Two pytest workers (pytest-xdist), a test file to each at a time: on 2 cores the suite takes about 17 minutes
# instead of 26 (most of it is single-threaded tracing and process start-up). TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
test: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=10

# Everything but the tests marked slow (whole trajectories, a UNet likelihood export): parity per call, noise, bad
# input, trust boundary, C++.
test-quick: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow"

# CPU loops side by side (docs/cpu.md): vpsde fp32/int8/all threads, vpsde bf16 on OpenVINO, bare graph calls, a
# plain ORT loop, diffusers eager and compiled, OpenVINO on the fp32 graph. About 15 minutes.
bench: install
	$(BIN)/python bench/cpu_loop.py --steps 100 --rounds 5 --batch 1 16 64 --loops vpsde-ort vpsde-ort-int8 \
		vpsde-openvino-bf16 vpsde-ort-all-threads vpsde-bare plain-ort-unet diffusers-eager diffusers-compile \
		openvino-f32 openvino

# Ray scale-out against the in-process Sampler; the local Ray instance runs in a private network namespace
# (loopback only), as the tests do.
# score_sde's DDPM++ at CIFAR scale (61.8 M parameters, random weights): every sampler exported in fp32 and fp16,
# ONNX vs eager on an untraced batch, eager vs vpsde ms/step, TensorRT-for-RTX build time (15-25 min on 2 cores).
bench-cifar: install
	$(BIN)/python bench/cifar_scale.py --json out/cifar_scale.json

bench-ray: install
	unshare -n bash -c 'ip link set lo up && RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 $(BIN)/python bench/ray_scaling.py'

# Load test of a local tritonserver (loopback, bounded) against the in-process Sampler.
bench-serve: install
	$(BIN)/python bench/serve_load.py --serve-env $(SERVE_VENV)

# The GPU check's parts for a device that reaches no package index (docs/gpu.md, "The GPU check in one lease"):
# onnxruntime-gpu for the device's Python and the check's packages, xz, cut into .gpucheck/partNN of 56 MiB; and
# the digits likelihood bundle the check times (its export takes minutes, so it travels instead).
gpu-pack: install
	rm -rf .gpucheck && $(BIN)/python bench/gpu_pack.py
	$(BIN)/vpsde export --model digits --sampler likelihood --out .gpucheck/lik

clean:
	rm -rf build out
