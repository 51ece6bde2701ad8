"""TensorRT engines built for real from exported bundles (TensorRT for RTX builds on a CPU-only machine for named
compute capabilities), the engine cache (key, reuse, stale and tampered engines, concurrent builders) and the
error messages. Running an engine needs an NVIDIA GPU of a targeted architecture; nothing here runs one.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os

import onnx
import pytest
from conftest import reseal
from onnx import TensorProto, helper

from vpsde.cli.main import main
from vpsde.export import VPSDE, export_bundle, load_model
from vpsde.runtime import BundleError, InputError
from vpsde.runtime.errors import BackendUnavailable
from vpsde.runtime.tensorrt.build import BatchProfile, build_engine
from vpsde.runtime.tensorrt.cache import ENGINE_DIR, EngineKey, build_cached, check_engine
from vpsde.runtime.tensorrt.flavor import load_flavor
from vpsde.runtime.tensorrt.runner import select_engines

try:
    FLAVOR = load_flavor("auto")
except BackendUnavailable as e:
    pytest.skip(f"no TensorRT here ({e})", allow_module_level=True)

if FLAVOR.targets_named_cc:
    TARGETS = ["SM86"]
else:  # full TensorRT builds for the GPU it runs on
    TARGETS = FLAVOR.compute_capabilities()
PROFILE = BatchProfile(1, 4, 16)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, diffusers_unet_dir):
    root = tmp_path_factory.mktemp("trt")
    adapter = load_model(f"diffusers:{diffusers_unet_dir}", VPSDE())
    return {
        "digits-fp32-em": export_bundle(load_model("digits", VPSDE()), root / "digits-fp32", steps=10, grid="uniform",
                                        log=lambda _: None),
        "diffusers-fp32-em": export_bundle(adapter, root / "diffusers-fp32", steps=10, grid="uniform", log=lambda _: None),
        "diffusers-fp16-em": export_bundle(adapter, root / "diffusers-fp16", steps=10, grid="uniform", precision="fp16",
                                           log=lambda _: None),
        "digits-fp16-em": export_bundle(load_model("digits", VPSDE()), root / "digits-fp16", steps=10, grid="uniform",
                                        precision="fp16", log=lambda _: None),
        "digits-bf16-em": export_bundle(load_model("digits", VPSDE()), root / "digits-bf16", steps=10, grid="uniform",
                                        precision="bf16", log=lambda _: None),
        "gmm-pc": export_bundle(load_model("gmm", VPSDE()), root / "gmm-pc", sampler="pc", steps=30, log=lambda _: None),
        "unet-dpmpp": export_bundle(load_model("unet-random:channels=8", VPSDE()), root / "unet-dpm",
                                    sampler="dpmpp-2m", steps=10, log=lambda _: None),
    }


@pytest.mark.parametrize("name", ["digits-fp32-em", "digits-fp16-em", "digits-bf16-em", "diffusers-fp32-em",
                                  "diffusers-fp16-em", "gmm-pc", "unet-dpmpp"])
def test_builds_real_engines_and_reuses_them(bundles, name):
    bundle = bundles[name]
    for graph in bundle.manifest.graphs:
        first = build_cached(bundle, graph, FLAVOR, PROFILE, TARGETS)
        assert first.built and first.plan.stat().st_size > 10_000
        check_engine(first.plan, first.key)  # the record matches the key and the bytes
        record = json.loads(first.plan.with_suffix(".json").read_text())
        assert record["key"]["precision"] == bundle.manifest.model.precision
        assert record["key"]["graph_sha256"] == bundle.manifest.graphs[graph].sha256
        mtime = first.plan.stat().st_mtime_ns
        again = build_cached(bundle, graph, FLAVOR, PROFILE, TARGETS)
        assert not again.built and again.plan == first.plan and first.plan.stat().st_mtime_ns == mtime


def test_key_covers_profile_and_target(bundles):
    bundle = bundles["gmm-pc"]
    a = EngineKey.for_graph(bundle, "langevin", FLAVOR, TARGETS, PROFILE)
    assert a != EngineKey.for_graph(bundle, "langevin", FLAVOR, TARGETS, BatchProfile(1, 8, 16))
    assert a.digest() != EngineKey.for_graph(bundle, "langevin", FLAVOR, ["SM89"], PROFILE).digest()
    assert a.digest() != EngineKey.for_graph(bundle, "reverse_diffusion", FLAVOR, TARGETS, PROFILE).digest()


def test_stale_engine_is_refused_then_rebuilt(bundles):
    bundle = bundles["gmm-pc"]
    engine = build_cached(bundle, "reverse_diffusion", FLAVOR, PROFILE, TARGETS)
    meta_path = engine.plan.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta["key"]["version"] = "0.0.1"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=r"stale or foreign engine, built for version '0.0.1'"):
        check_engine(engine.plan, engine.key)
    notes = []
    rebuilt = build_cached(bundle, "reverse_diffusion", FLAVOR, PROFILE, TARGETS, log=notes.append)
    assert rebuilt.built and notes and "stale" in notes[0]
    check_engine(rebuilt.plan, rebuilt.key)


def test_tampered_engine_is_refused_then_rebuilt(bundles):
    bundle = bundles["gmm-pc"]
    engine = build_cached(bundle, "langevin", FLAVOR, PROFILE, TARGETS)
    with open(engine.plan, "r+b") as f:
        f.seek(1000)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(BundleError, match="sha256 does not match"):
        check_engine(engine.plan, engine.key)
    assert build_cached(bundle, "langevin", FLAVOR, PROFILE, TARGETS).built


def _build_forced(root: str) -> None:
    from vpsde.runtime import Bundle

    build_cached(Bundle.load(root), "em", load_flavor("auto"), PROFILE, TARGETS, force=True)


def test_concurrent_builders_do_not_corrupt_the_engine(bundles):
    """Two processes force-building the same engine: both finish, the survivor matches its record, and no
    temporary file is left behind."""
    bundle = bundles["digits-fp16-em"]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_build_forced, args=(str(bundle.root),)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
        assert p.exitcode == 0
    key = EngineKey.for_graph(bundle, "em", FLAVOR, TARGETS, PROFILE)
    check_engine(bundle.root / ENGINE_DIR / f"{key.stem()}.plan", key)
    assert not [f for f in os.listdir(bundle.root / ENGINE_DIR) if "tmp" in f]


def test_parser_errors_name_the_node(tmp_path):
    graph = helper.make_graph([helper.make_node("NoSuchOp", ["x"], ["y"], name="mystery_node")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])])
    path = tmp_path / "bad.onnx"
    data = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()
    with pytest.raises(BundleError, match=r"bad\.onnx: .*cannot parse.*mystery_node.*NoSuchOp"):
        build_engine(FLAVOR, data, path, PROFILE, TARGETS)


@pytest.mark.parametrize("text", ["0:1:2", "8:4:16", "a:b:c", "1:2", ""])
def test_bad_profiles(text):
    with pytest.raises(InputError, match="--batch"):
        BatchProfile.parse(text)
    assert BatchProfile.parse("8") == BatchProfile(8, 8, 8)


def test_cli_build_and_errors(bundles, capsys):
    root = str(bundles["unet-dpmpp"].root)
    cc = ["--target-cc", TARGETS[0]] if FLAVOR.targets_named_cc else []
    assert main(["build", root, "--batch", "1:2:8", *cc]) == 0
    assert "built in" in capsys.readouterr().out
    assert main(["build", root, "--batch", "1:2:8", *cc]) == 0
    assert "cached (valid, reused)" in capsys.readouterr().out
    assert main(["build", root, "--batch", "4:2:1", *cc]) == 2
    if FLAVOR.targets_named_cc:
        assert main(["build", root, "--target-cc", "SM90"]) == 2
        assert "SM90" in capsys.readouterr().err


def test_engine_selection_for_sampling(bundles):
    """`vpsde sample --backend tensorrt` picks cached engines by graph sha256, flavour, version, precision and
    target; with none it says what the cache holds and how to build (checked on records of real engines)."""
    bundle = bundles["unet-dpmpp"]
    engine = build_cached(bundle, "dpmpp_2m", FLAVOR, BatchProfile(1, 2, 8), TARGETS)
    picked = select_engines(bundle, "dpmpp_2m", FLAVOR, TARGETS[0])
    assert (engine.key, engine.plan) in picked
    assert all(k.targets == tuple(TARGETS) or TARGETS[0] in k.targets for k, _ in picked)
    with pytest.raises(BundleError, match=r"no engine of graph 'dpmpp_2m' for SM61 .*cache holds: .*batch 1:2:8.*"
                                          r"run `vpsde build"):
        select_engines(bundle, "dpmpp_2m", FLAVOR, "SM61")


def test_engine_from_another_graph_version_is_named(bundles, tmp_path):
    import shutil

    from vpsde.runtime import Bundle

    src = bundles["unet-dpmpp"]
    build_cached(src, "dpmpp_2m", FLAVOR, PROFILE, TARGETS)
    copy = tmp_path / "copy"
    shutil.copytree(src.root, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    graph_file = copy / manifest["graphs"]["dpmpp_2m"]["file"]
    # a re-export: same names, a different graph (one more no-op node changes the bytes and the sha256)
    model = onnx.load(str(graph_file))
    model.producer_version = "re-exported"
    onnx.save(model, str(graph_file))
    manifest["graphs"]["dpmpp_2m"]["sha256"] = hashlib.sha256(graph_file.read_bytes()).hexdigest()
    (copy / "manifest.json").write_text(json.dumps(manifest))
    reseal(copy)
    with pytest.raises(BundleError, match=r"another graph version"):
        select_engines(Bundle.load(copy), "dpmpp_2m", FLAVOR, TARGETS[0])
    shutil.rmtree(copy / ENGINE_DIR)
    with pytest.raises(BundleError, match=r"cache holds: nothing\); run `vpsde build"):
        select_engines(Bundle.load(copy), "dpmpp_2m", FLAVOR, TARGETS[0])


def test_tensorrt_backend_without_a_gpu_says_so(bundles, capsys):
    """On a machine without an NVIDIA GPU (CI), sampling on TensorRT fails with one plain line, no traceback."""
    pytest.importorskip("cuda.bindings", reason="cuda-python is not installed")
    from vpsde.runtime.tensorrt.cuda import gpu_info

    try:
        gpu_info()
        pytest.skip("this machine has a GPU; tests/test_gpu.py runs the tensorrt backend")
    except BackendUnavailable:
        pass
    root = str(bundles["unet-dpmpp"].root)
    assert main(["sample", root, "--backend", "tensorrt", "--num", "2", "--out", root + "-out"]) == 2
    err = capsys.readouterr().err
    assert "no usable NVIDIA GPU here" in err and "Traceback" not in err
    assert main(["sample", root, "--backend", "tensorrt", "--device", "cpu", "--num", "2"]) == 2
    assert "runs on an NVIDIA GPU (--device cuda)" in capsys.readouterr().err


def test_inspect_lists_cached_engines_and_their_state(bundles, capsys):
    bundle = bundles["gmm-pc"]
    engine = build_cached(bundle, "langevin", FLAVOR, BatchProfile(2, 2, 2), TARGETS)
    assert main(["inspect", str(bundle.root)]) == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if engine.plan.name in ln]
    assert len(line) == 1 and "batch 2:2:2" in line[0] and line[0].endswith("ok")
    with open(engine.plan, "r+b") as f:
        f.seek(500)
        f.write(b"\xff\xfe")
    assert main(["inspect", str(bundle.root)]) == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if engine.plan.name in ln]
    assert "unusable" in line[0] and "sha256" in line[0]
