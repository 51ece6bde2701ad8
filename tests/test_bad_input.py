"""Bad input gives one clear error naming the file and field, never a raw traceback from onnxruntime."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import reseal

from vpsde.export import VPSDE, export_bundle
from vpsde.models.base import ScoreModel
from vpsde.runtime import Bundle, BundleError, InputError, NonFiniteError, Sampler
from vpsde.runtime.backends.onnxruntime import OnnxRuntimeRunner, session_from_bundle


@pytest.fixture
def bundle_copy(gmm_bundle, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(gmm_bundle.root, dst)
    return dst


def _edit_manifest(root, edit):
    path = root / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    reseal(root)


@pytest.mark.parametrize("edit, field", [
    (lambda d: d.update(schema_version=4), "schema_version"),
    (lambda d: d.update(format="something"), "format"),
    (lambda d: d["sampler"].update(steps="1000"), "sampler.steps"),
    (lambda d: d["sde"].pop("beta_max"), "sde.beta_max"),
    (lambda d: d["schedule"]["t"].pop(), "schedule.t"),
    (lambda d: d["schedule"]["dt"].__setitem__(0, 0.01), "schedule.dt"),
    (lambda d: d["sampler"]["program"][0].update(graph="corrector"), "sampler.program[0].graph"),
    (lambda d: d["graphs"]["em"]["inputs"][0].update(shape=["batch", 3]), "graphs.em.inputs[0].shape"),
    (lambda d: d["graphs"]["em"]["inputs"][0].update(dtype="float99"), "graphs.em.inputs[0].dtype"),
    (lambda d: d["graphs"]["em"].update(file="../elsewhere.onnx"), "graphs.em.file"),
    (lambda d: d["noise"].update(inputs=[]), "graphs.em.inputs[4]"),  # 'noise' would have no source
    (lambda d: d["sampler"].update(state=[{"input": "h", "output": "h_out", "init": "ones"}]), "sampler.state[0].init"),
    (lambda d: d["sampler"].update(params={"snr": True}), "sampler.params.snr"),
])
def test_edited_manifest_names_the_field(bundle_copy, edit, field):
    _edit_manifest(bundle_copy, edit)
    with pytest.raises(BundleError) as e:
        Bundle.load(bundle_copy)
    assert f"'{field}" in str(e.value) and "manifest.json" in str(e.value)


def test_schema_version_1_still_reads(bundle_copy):
    """A v1 manifest (EM only: no noise.inputs, state, conditioning or params) reads as the same sampler."""
    def to_v1(d):
        d["schema_version"] = 1
        del d["noise"]["inputs"], d["sampler"]["state"], d["sampler"]["conditioning"], d["sampler"]["params"]
    _edit_manifest(bundle_copy, to_v1)
    m = Bundle.load(bundle_copy).manifest
    assert m.schema_version == 1 and m.noise.inputs == ["noise"] and m.sampler.state == []


def test_missing_graph(bundle_copy):
    (bundle_copy / "em.onnx").unlink()
    with pytest.raises(BundleError, match=r"em\.onnx.*missing"):
        Bundle.load(bundle_copy)


def test_modified_graph_fails_sha256(bundle_copy):
    with open(bundle_copy / "em.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="sha256"):
        Bundle.load(bundle_copy)


def test_corrupted_onnx_with_matching_sha_is_a_clear_error(bundle_copy):
    """Garbage that the manifest's sha256 vouches for is refused at load, naming the file; a well-formed model that
    ONNX Runtime cannot load (an unknown operator) gets ORT's failure wrapped, naming the file."""
    import onnx
    from onnx import TensorProto, helper

    from vpsde.runtime.bundle import sha256_file

    (bundle_copy / "em.onnx").write_bytes(b"this is not an onnx model")
    _edit_manifest(bundle_copy, lambda d: d["graphs"]["em"].update(sha256=sha256_file(bundle_copy / "em.onnx")))
    with pytest.raises(BundleError, match=r"em\.onnx: graph 'em' is not an ONNX model"):
        Sampler(bundle_copy)
    graph = helper.make_graph([helper.make_node("NoSuchOp", ["x"], ["x_next"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])],
                              [helper.make_tensor_value_info("x_next", TensorProto.FLOAT, ["batch", 2])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), bundle_copy / "em.onnx")
    _edit_manifest(bundle_copy, lambda d: d["graphs"]["em"].update(sha256=sha256_file(bundle_copy / "em.onnx")))
    with pytest.raises(BundleError, match=r"em\.onnx: ONNX Runtime could not load graph 'em'"):
        Sampler(bundle_copy)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="not a directory"):
        Bundle.load(tmp_path / "nothing")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="SHA256SUMS: missing"):
        Bundle.load(tmp_path)
    reseal(tmp_path)
    with pytest.raises(BundleError, match="not valid JSON"):
        Bundle.load(tmp_path)


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider' is not in available")  # the fall-back
def test_a_gpu_provider_onnx_runtime_cannot_start_is_an_error_not_a_silent_cpu_run(gmm_bundle, monkeypatch):
    """ONNX Runtime falls back to the CPU when its CUDA provider is listed but cannot start (missing CUDA or cuDNN
    libraries: the commonest GPU deployment failure), logging one line. Here the CPU build is made to list the
    provider, so the real session falls back exactly so; vpsde must refuse, not sample on the CPU as 'cuda'."""
    import onnxruntime as ort

    from vpsde.runtime.errors import BackendUnavailable

    listed = ort.get_available_providers()
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", *listed])
    with pytest.raises(BackendUnavailable, match=r"could not start its CUDAExecutionProvider \(it fell back to "
                                                 r"CPUExecutionProvider\)"):
        session_from_bundle(gmm_bundle, "em", device="cuda")
    with pytest.raises(BackendUnavailable, match="could not start its CUDAExecutionProvider"):
        Sampler(gmm_bundle, device="cuda", progress=False)
    assert session_from_bundle(gmm_bundle, "em").get_providers() == ["CPUExecutionProvider"]  # the CPU is unchanged


def test_wrong_dtype_and_shape_are_refused(gmm_bundle):
    runner = OnnxRuntimeRunner(session_from_bundle(gmm_bundle, "em"), gmm_bundle, "em")
    rs = np.random.default_rng(0)
    feed = {"x": rs.standard_normal((3, 2)).astype(np.float32), "t": np.full(3, 0.5, np.float32),
            "dt": np.full(3, -1e-3, np.float32), "sqrt_neg_dt": np.full(3, 0.0316, np.float32),
            "noise": rs.standard_normal((3, 2)).astype(np.float32)}
    runner.infer(feed)  # the good feed runs
    with pytest.raises(InputError, match=r"input 'x': expected float32 \(3, 2\), got float64"):
        runner.infer({**feed, "x": feed["x"].astype(np.float64)})
    with pytest.raises(InputError, match=r"input 'noise': expected float32 \(3, 2\), got float32 \(3, 3\)"):
        runner.infer({**feed, "noise": np.zeros((3, 3), np.float32)})
    with pytest.raises(InputError, match="expected inputs"):
        runner.infer({k: v for k, v in feed.items() if k != "dt"})


class NaNBelow(ScoreModel):
    """A model whose output turns NaN for t < 0.3 (in the graph, not on the host)."""

    sample_shape = (2,)
    name = "nan-below-0.3"

    def forward(self, x, t):
        return x * 0.0 + torch.where(t < 0.3, torch.full_like(t, float("nan")), torch.zeros_like(t))[:, None]


def test_nan_guard_names_the_step(tmp_path):
    bundle = export_bundle(NaNBelow(), tmp_path / "nan", steps=10, grid="uniform", sde=VPSDE(), log=lambda _: None)
    with pytest.raises(NonFiniteError) as e:
        Sampler(bundle, progress=False).sample(4, seed=0)
    msg = str(e.value)
    assert "step 8 (of 0..9" in msg and "em.onnx" in msg and "NaN/Inf" in msg  # t_7 = 0.3007, t_8 = 0.2008
    out = Sampler(bundle, progress=False, nan_guard=False).sample(4, seed=0)  # without the guard: NaN out
    assert np.isnan(out).all()


def test_export_refuses_to_overwrite_and_leaves_nothing_on_failure(tmp_path, gmm_bundle):
    with pytest.raises(FileExistsError):
        export_bundle(NaNBelow(), gmm_bundle.root, steps=10, log=lambda _: None)

    class Broken(NaNBelow):
        def forward(self, x, t):
            raise RuntimeError("boom")

    with pytest.raises(Exception, match="boom"):
        export_bundle(Broken(), tmp_path / "broken", steps=10, log=lambda _: None)
    assert list(tmp_path.iterdir()) == []  # no half-written bundle, no temporary directory
