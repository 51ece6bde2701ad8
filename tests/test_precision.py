"""Mixed precision (--precision fp16 | bf16): the network in half precision, the VP-SDE arithmetic and graph IO
in float32.

Bounds, on the noise prediction eps (unit scale), from t = 1 down to t = eps = 1e-3, and always finite:
- fp16: max abs <= 1e-2. float16 has a 2^-11 = 4.9e-4 unit roundoff; the shipped UNet's ~30 layers measured
  2e-3 to 3.5e-3 in torch's float16 CPU kernels.
- bf16: max abs <= 8e-2, the fp16 bound scaled by the ratio of unit roundoffs (2^-8 / 2^-11 = 8). Measured 1.3e-2
  to 2.6e-2 in torch's bfloat16 kernels, 1.5e-2 to 2.4e-2 for the exported graph in ONNX's reference evaluator.
The graphs are also checked structurally: Conv runs on half tensors, Sqrt/Sinh (std) on float32 ones.
ONNX Runtime runs the fp16 graph on CPU (through inserted float32 casts); it has no bfloat16 kernels, so the bf16
graph is run with ``onnx.reference.ReferenceEvaluator`` (numpy, bfloat16 tensors between nodes).
"""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
import torch

from vpsde.export import VPSDE, export_bundle
from vpsde.export.precision import with_precision
from vpsde.export.steps import EulerMaruyamaStep
from vpsde.runtime import Sampler
from vpsde.runtime.backends.onnxruntime import OnnxRuntimeRunner, session_from_bundle
from vpsde.runtime.errors import BackendUnavailable

EPS_BOUND = 1e-2
BOUNDS = {"fp16": 1e-2, "bf16": 8e-2}
ONNX_TYPES = {"fp16": onnx.TensorProto.FLOAT16, "bf16": onnx.TensorProto.BFLOAT16}
T_VALUES = (1.0, 0.5, 0.1, 0.01, 1e-3)


def noisy_digits(sde, t, n, g):
    """x_t for fresh random x_0 in [-1, 1]: inputs at the noise level the model sees at t."""
    x0 = torch.rand((n, 1, 16, 16), generator=g) * 2 - 1
    tt = torch.full((n,), t)
    return sde.mean_coeff(tt)[:, None, None, None] * x0 + sde.std(tt)[:, None, None, None] * torch.randn(
        (n, 1, 16, 16), generator=g), tt


@pytest.mark.parametrize("precision", list(BOUNDS))
@pytest.mark.parametrize("t", T_VALUES)
def test_half_network_error_is_bounded_and_finite(digits, precision, t, rng):
    """torch's float16 / bfloat16 kernels (real half arithmetic) vs float32."""
    half = with_precision(digits, precision)
    x, tt = noisy_digits(VPSDE(), t, 8, rng)
    with torch.no_grad():
        e32, e16 = digits(x, tt), half(x, tt)
    assert e16.dtype == torch.float32 and torch.isfinite(e16).all()
    err = (e16 - e32).abs().max()
    assert 0 < err <= BOUNDS[precision]  # > 0: the half precision is really in effect


@pytest.fixture(scope="module")
def fp16_bundle(digits, tmp_path_factory):
    return export_bundle(digits, tmp_path_factory.mktemp("fp16") / "b", steps=12, grid="logsnr", precision="fp16",
                         value_range=(-1, 1), log=lambda _: None)


@pytest.fixture(scope="module")
def bf16_bundle(digits, tmp_path_factory):
    return export_bundle(digits, tmp_path_factory.mktemp("bf16") / "b", steps=12, grid="logsnr", precision="bf16",
                         value_range=(-1, 1), log=lambda _: None)


@pytest.mark.parametrize("precision", list(BOUNDS))
def test_half_graph_is_typed_as_intended(precision, fp16_bundle, bf16_bundle):
    bundle = {"fp16": fp16_bundle, "bf16": bf16_bundle}[precision]
    m = bundle.manifest
    assert m.model.precision == precision
    assert {s.dtype for g in m.graphs.values() for s in (*g.inputs, *g.outputs)} == {"float32"}
    assert m.graphs["em"].opset == (22 if precision == "bf16" else 18)
    model = onnx.shape_inference.infer_shapes(onnx.load(str(bundle.graph_path("em"))))
    types = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.value_info, *model.graph.input,
                                                             *model.graph.output)}
    types.update({init.name: init.data_type for init in model.graph.initializer})
    ops = {}
    for node in model.graph.node:
        ops.setdefault(node.op_type, []).append(node)
    assert ops.get("Conv"), "no Conv in the graph"
    assert all(types[n.input[0]] == ONNX_TYPES[precision] for n in ops["Conv"])
    sde_ops = [n for op in ("Sqrt", "Sinh") for n in ops.get(op, [])]
    assert sde_ops and all(types[n.output[0]] == onnx.TensorProto.FLOAT for n in sde_ops)


def test_fp16_graph_per_call_bound_on_the_whole_grid(fp16_bundle, digits, rng):
    """ONNX Runtime fp16 graph vs the float32 eager step at every step down to t = eps: the x_mean difference,
    divided by the factor beta |dt| / std that maps eps onto x_mean, stays within the eps bound."""
    m, sde = fp16_bundle.manifest, VPSDE()
    runner = OnnxRuntimeRunner(session_from_bundle(fp16_bundle, "em", threads=1), fp16_bundle, "em")
    step = EulerMaruyamaStep(digits, sde)
    for i, t in enumerate(m.schedule["t"]):
        x, tt = noisy_digits(sde, t, 4, rng)
        feed = {"x": x.numpy(), "t": tt.numpy(), "noise": torch.randn(x.shape, generator=rng).numpy(),
                **{k: np.full(4, m.schedule[k][i], np.float32) for k in ("dt", "sqrt_neg_dt")}}
        got = runner.infer(feed)
        with torch.no_grad():
            ref = step(*(torch.from_numpy(feed[k]) for k in step.input_names))[1].numpy()
        assert np.isfinite(got["x_mean"]).all() and np.isfinite(got["x_next"]).all()
        to_eps = float(sde.beta(torch.tensor(t)) * -m.schedule["dt"][i] / sde.std(torch.tensor(t)))
        assert np.abs(got["x_mean"] - ref).max() / to_eps <= EPS_BOUND, f"step {i}, t = {t:.4g}"


def test_fp16_samples_are_finite(fp16_bundle):
    x = Sampler(fp16_bundle, progress=False, threads=1).sample(4, seed=0)
    assert np.isfinite(x).all() and x.std() > 0.1


def test_bf16_graph_per_call_bound_on_the_whole_grid(bf16_bundle, digits, rng):
    """The exported bf16 graph, run by ONNX's reference evaluator (bfloat16 tensors between nodes), vs the float32
    eager step at every step down to t = eps, judged on eps as for fp16 above."""
    from onnx.reference import ReferenceEvaluator

    m, sde = bf16_bundle.manifest, VPSDE()
    graph = ReferenceEvaluator(onnx.load(str(bf16_bundle.graph_path("em"))))
    names = [s.name for s in m.graphs["em"].outputs]
    step = EulerMaruyamaStep(digits, sde)
    errors = []
    for i, t in enumerate(m.schedule["t"]):
        x, tt = noisy_digits(sde, t, 4, rng)
        feed = {"x": x.numpy(), "t": tt.numpy(), "noise": torch.randn(x.shape, generator=rng).numpy(),
                **{k: np.full(4, m.schedule[k][i], np.float32) for k in ("dt", "sqrt_neg_dt")}}
        got = dict(zip(names, graph.run(None, feed)))
        with torch.no_grad():
            ref = step(*(torch.from_numpy(feed[k]) for k in step.input_names))[1].numpy()
        assert got["x_mean"].dtype == np.float32 and np.isfinite(got["x_mean"]).all()
        to_eps = float(sde.beta(torch.tensor(t)) * -m.schedule["dt"][i] / sde.std(torch.tensor(t)))
        errors.append(np.abs(got["x_mean"] - ref).max() / to_eps)
        assert errors[-1] <= BOUNDS["bf16"], f"step {i}, t = {t:.4g}: {errors[-1]:.2e}"
    print(f"\nbf16 graph (ONNX reference evaluator) eps error per step: {min(errors):.2e} .. {max(errors):.2e}")
    assert min(errors) > 0


def test_bf16_bundle_is_refused_by_ort_cpu_with_the_reason(bf16_bundle):
    with pytest.raises(BackendUnavailable, match=r"bf16 bundle .*no bfloat16 kernels.*--backend openvino .*or tensorrt"):
        Sampler(bf16_bundle, progress=False)


def test_a_triton_repository_the_server_could_not_load_is_refused_as_it_is_written(bf16_bundle, tmp_path):
    """vpsde triton / vpsde serve apply the sampler's placement rule (runtime/backends: check_placement) when they
    write the repository: a bf16 bundle on ONNX Runtime's CPU provider, or tensorrt on the CPU, failed only as
    every model instance loaded on the server."""
    from vpsde.runtime.errors import InputError
    from vpsde.serving.repository import write_repository

    for backend, device, said in [("onnxruntime", "cpu", "no bfloat16 kernels"),
                                  ("tensorrt", "cpu", "tensorrt backend runs on an NVIDIA GPU (--device cuda), not 'cpu'")]:
        with pytest.raises(InputError, match=re.escape(said)):
            write_repository(bf16_bundle, tmp_path / "repo", backend=backend, device=device)
        assert not (tmp_path / "repo").exists()
    write_repository(bf16_bundle, tmp_path / "repo", backend="onnxruntime", device="cuda")  # a GPU host's repository
    assert (tmp_path / "repo" / "vpsde" / "config.pbtxt").is_file()


def test_unknown_precision_and_low_opset_are_refused(digits, tmp_path):
    with pytest.raises(ValueError, match="unknown precision 'int4'"):
        export_bundle(digits, tmp_path / "b", steps=4, precision="int4", log=lambda _: None)
    with pytest.raises(ValueError, match="bf16 needs opset 22"):
        export_bundle(digits, tmp_path / "b", steps=4, precision="bf16", opset=18, log=lambda _: None)
    with pytest.raises(ValueError, match="opset 7: torch.onnx exports opset 18 or later"):  # said "Conv has no fp32"
        export_bundle(digits, tmp_path / "b", steps=4, opset=7, log=lambda _: None)
    with pytest.raises(ValueError, match=r"opset 99: the installed onnx .* knows opsets up to \d+"):  # was written
        export_bundle(digits, tmp_path / "b", steps=4, opset=99, log=lambda _: None)
    for bad in ((1.0, 0.0), (float("nan"), 1.0), (0.0,)):  # named the temporary manifest's field
        with pytest.raises(ValueError, match=r"value_range: expected finite LO < HI, got \["):
            export_bundle(digits, tmp_path / "b", steps=4, value_range=bad, log=lambda _: None)
    assert not (tmp_path / "b").exists()


def test_gpu_step_check_on_the_cpu_provider(fp16_bundle, digits, rng):
    """The per-step check tests/test_gpu*.py apply on a GPU (conftest.em_step_errors), run here on ONNX Runtime's
    CPU provider so that it is exercised in CI: the fp16 graph within the same eps bound, and > 0 (fp16 is real)."""
    from conftest import em_step_errors

    runner = OnnxRuntimeRunner(session_from_bundle(fp16_bundle, "em", threads=1), fp16_bundle, "em")
    errors = em_step_errors(runner, fp16_bundle, digits, range(len(fp16_bundle.manifest.schedule["t"])), rng)
    assert 0 < max(errors) <= BOUNDS["fp16"]


def test_a_rotated_mixture_exports_in_half_precision(tmp_path):
    """`--model gmm:full=1 --precision fp16` died in torch.export (float32 differences @ float16 rotations: matmul
    does not promote). Now it exports, and its samples stay within the fp16 final-sample bar (relative L2 1e-2,
    verify/tolerances.py) of the fp32 bundle's, same seed; the fp32 graph is unchanged by the fix (checked by
    hand: identical SHA256SUMS before and after)."""
    from vpsde.export import load_model

    gmm = load_model("gmm:dim=3,components=3,full=1,seed=2", VPSDE())
    kw = dict(steps=10, grid="uniform", log=lambda _: None)
    fp32 = Sampler(export_bundle(gmm, tmp_path / "fp32", **kw), progress=False).sample(64, seed=5)
    fp16 = Sampler(export_bundle(gmm, tmp_path / "fp16", precision="fp16", **kw), progress=False).sample(64, seed=5)
    assert np.isfinite(fp16).all()
    assert np.linalg.norm(fp16 - fp32) <= 1e-2 * np.linalg.norm(fp32)
