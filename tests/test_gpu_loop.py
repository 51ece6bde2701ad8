"""bench/gpu_loop.py, the GPU check's side-by-side loop benchmark, runs on the CPU too, so its harness cannot rot:
its torch.compile contender computes diffusers' EM step (checked against the scheduler itself), every loop and
batch lands in the JSON, and a loop that cannot run here is reported instead of timed."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers.schedulers.deprecated.scheduling_sde_vp import ScoreSdeVpScheduler

ROOT = Path(__file__).parent.parent


def load_gpu_loop():
    spec = importlib.util.spec_from_file_location("gpu_loop", ROOT / "bench" / "gpu_loop.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_em_step_is_diffusers_step_pred_bit_for_bit():
    """The compiled contender's step, run eagerly, equals ScoreSdeVpScheduler.step_pred on fresh random inputs
    when both draw the same noise: bit for bit, since it is the same float32 arithmetic in the same order."""
    gpu_loop = load_gpu_loop()
    steps, batch = 7, 3
    sched = ScoreSdeVpScheduler(num_train_timesteps=1000)
    sched.set_timesteps(steps)
    gen = torch.Generator().manual_seed(1234)
    weight = torch.randn(2, generator=gen)
    model = lambda x, t: weight[0] * x + weight[1] * t.view(-1, 1, 1, 1)  # noqa: E731
    for t in sched.timesteps:
        x = torch.randn(batch, 1, 4, 4, generator=gen)
        tv = t.repeat(batch)
        seed = int(torch.randint(0, 2**31, (), generator=gen))
        expected, expected_mean = sched.step_pred(model(x, tv), x, tv, generator=torch.Generator().manual_seed(seed))
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
        got, got_mean = gpu_loop.em_step(model, x, tv, noise, dt=-1.0 / steps, beta_min=sched.config.beta_min,
                                         beta_max=sched.config.beta_max, dtype=torch.float32)
        assert torch.isfinite(got).all()
        assert torch.equal(got, expected) and torch.equal(got_mean, expected_mean)


@pytest.mark.slow
def test_harness_on_the_cpu(tmp_path):
    """Eager diffusers, vpsde on ONNX Runtime's CPU provider and torch.compile of the whole step (one batch size:
    each compiles once per size, about 25 s here; the GPU check's rehearsal times two sizes of the other loops);
    the CUDA loop, absent here, is listed with its reason. The compiled loop draws the eager loop's noise, so
    its sample differs only by float32 rounding (bar 1e-3; a noise drawn out of order or a wrong update differs
    by O(1))."""
    out = tmp_path / "loop.json"
    r = subprocess.run([sys.executable, "bench/gpu_loop.py", "--device", "cpu", "--steps", "3", "--batch", "2",
                        "--repeats", "1", "--loops", "diffusers-eager", "vpsde-ort-cpu", "vpsde-ort-cuda",
                        "torch-compile", "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(out.read_text())
    loops = doc["loops"]
    assert list(loops) == ["diffusers-eager", "vpsde-ort-cpu", "vpsde-ort-cuda", "torch-compile"]
    for kind in ("diffusers-eager", "vpsde-ort-cpu", "torch-compile"):
        assert "error" not in loops[kind], loops[kind]
        assert list(loops[kind]["batches"]) == ["2"]
        for row in loops[kind]["batches"].values():
            assert row["median_s"] > 0 and row["vs_eager"] > 0
    for row in loops["vpsde-ort-cpu"]["batches"].values():
        assert row["loop_overhead"] > 0 and row["bare_ms_per_step"] > 0
    for row in loops["torch-compile"]["batches"].values():
        diff = row["max_abs_diff_vs_eager"]
        assert math.isfinite(diff) and diff <= 1e-3
    assert loops["vpsde-ort-cuda"]["batches"] == {} and "CUDA" in loops["vpsde-ort-cuda"]["error"]
    assert "vpsde-ort-cuda" in r.stdout and "not run:" in r.stdout
