"""ONNX Runtime step vs the eager torch step: max abs error <= 1e-5 per call (float32; DESIGN.md's bar: the
same float32 ops, reordered or fused by ORT, differ by a few ulp on unit-scale values), at batch sizes other
than the traced one (2)."""

import numpy as np
import onnx
import pytest
import torch

from vpsde.export import VPSDE, load_model
from vpsde.export.steps import EulerMaruyamaStep
from vpsde.runtime.backends.onnxruntime import OnnxRuntimeRunner, session_from_bundle

ATOL = 1e-5


def _random_feed(shape, batch, rng):
    x = torch.randn((batch, *shape), generator=rng)
    t = 1e-3 + (1 - 1e-3) * torch.rand(batch, generator=rng)
    dt = -torch.rand(batch, generator=rng) * 0.01 - 1e-4
    return {"x": x, "t": t, "dt": dt, "sqrt_neg_dt": torch.sqrt(-dt), "noise": torch.randn((batch, *shape), generator=rng)}


@pytest.mark.parametrize("bundle_name", ["unet_bundle", "gmm_bundle"])
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_ort_step_matches_eager(bundle_name, batch, request, rng):
    bundle = request.getfixturevalue(bundle_name)
    m = bundle.manifest
    sde = VPSDE(std_formula=m.sde.std_formula)
    if bundle_name == "unet_bundle":
        from conftest import tiny_unet

        model = tiny_unet()
    else:
        model = load_model("gmm", sde)
    step = EulerMaruyamaStep(model, sde).eval()
    runner = OnnxRuntimeRunner(session_from_bundle(bundle, "em"), bundle, "em")
    for _ in range(5):
        feed = _random_feed(tuple(m.model.sample_shape), batch, rng)
        with torch.no_grad():
            ref = step(*feed.values())
        out = runner.infer({k: v.numpy() for k, v in feed.items()})
        for name, r in zip(("x_next", "x_mean"), ref):
            err = np.abs(out[name] - r.numpy()).max()
            assert np.isfinite(out[name]).all()
            assert err <= ATOL, f"{name}: max abs error {err:.3g} > {ATOL} (batch {batch})"


def test_exported_graph_is_checked_and_batch_symbolic(unet_bundle):
    model = onnx.load(str(unet_bundle.graph_path("em")))
    onnx.checker.check_model(model, full_check=True)
    for v in [*model.graph.input, *model.graph.output]:
        assert v.type.tensor_type.shape.dim[0].dim_param == "batch", v.name
    assert {i.name for i in model.graph.input} == {"x", "t", "dt", "sqrt_neg_dt", "noise"}
    assert not any(n.domain not in ("", "ai.onnx") for n in model.graph.node), "custom ops in the graph"


@pytest.mark.parametrize("bundle_name", ["unet_bundle", "gmm_bundle"])
def test_graphs_carry_no_trace_of_where_vpsde_is_installed(bundle_name, request):
    """torch's exporter records per node the Python stack that made it (absolute source paths): dropped, so a
    bundle's bytes and digest do not depend on the exporting machine's directories."""
    from pathlib import Path

    import vpsde.export

    bundle = request.getfixturevalue(bundle_name)
    source = str(Path(vpsde.export.__file__).resolve().parent.parent).encode()  # where vpsde's sources are
    for spec in bundle.manifest.graphs.values():
        data = (bundle.root / spec.file).read_bytes()
        assert source not in data and b"stack_trace" not in data
        model = onnx.load_from_string(data)
        assert not any(node.metadata_props or node.doc_string for node in model.graph.node)
