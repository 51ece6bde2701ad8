"""TensorRT engines built for real from exported bundles (TensorRT for RTX builds on a CPU-only machine for named
compute capabilities), the engine cache (key, reuse, stale and tampered engines, concurrent builders) and the
error messages. Running an engine needs an NVIDIA GPU of a targeted architecture; nothing here runs one.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os

import onnx
import pytest
from onnx import TensorProto, helper

from vpsde.cli.main import main
from vpsde.export import VPSDE, export_bundle, load_model
from vpsde.runtime import BundleError, InputError
from vpsde.runtime.errors import BackendUnavailable
from vpsde.runtime.tensorrt.build import BatchProfile, build_engine
from vpsde.runtime.tensorrt.cache import ENGINE_DIR, EngineKey, build_cached, check_engine
from vpsde.runtime.tensorrt.flavor import load_flavor

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
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("trt")
    return {
        "digits-fp16-em": export_bundle(load_model("digits", VPSDE()), root / "digits-fp16", steps=10, grid="uniform",
                                        precision="fp16", log=lambda _: None),
        "gmm-pc": export_bundle(load_model("gmm", VPSDE()), root / "gmm-pc", sampler="pc", steps=30, log=lambda _: None),
        "unet-dpmpp": export_bundle(load_model("unet-random:channels=8", VPSDE()), root / "unet-dpm",
                                    sampler="dpmpp-2m", steps=10, log=lambda _: None),
    }


@pytest.mark.parametrize("name", ["digits-fp16-em", "gmm-pc", "unet-dpmpp"])
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
    assert not [f for f in os.listdir(bundle.root / ENGINE_DIR) if ".tmp" in f]


def test_parser_errors_name_the_node(tmp_path):
    graph = helper.make_graph([helper.make_node("NoSuchOp", ["x"], ["y"], name="mystery_node")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])])
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    with pytest.raises(BundleError, match=r"bad\.onnx: .*cannot parse.*mystery_node.*NoSuchOp"):
        build_engine(FLAVOR, path, PROFILE, TARGETS)


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
