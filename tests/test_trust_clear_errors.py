"""Trust boundary, every failure is one clear line: cases that ended in a Python traceback (or a hang, or a
segfault) now exit 2 with a message that names the file, the field or the argument, in both hosts."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from conftest import copy_bundle, edit_manifest, reseal, run_host

from vpsde.cli.main import main
from vpsde.export import load_model
from vpsde.export.sources import ModelSpecError
from vpsde.models.sde import VPSDE
from vpsde.runtime import Bundle, BundleError, Sampler

CLI = [sys.executable, "-m", "vpsde.cli.main"]


@pytest.fixture
def bundle(gmm_bundle, tmp_path):
    return copy_bundle(gmm_bundle, tmp_path / "b")


def _both(bundle, host, tmp_path, expect: str) -> None:
    """Python (Bundle.load and the CLI) and the C++ host: exit 2, ``expect`` in the one-line message."""
    with pytest.raises(BundleError, match=expect):
        Bundle.load(bundle)
    r = subprocess.run([*CLI, "inspect", str(bundle)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and expect in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = run_host(host / "vpsde-sample", bundle, "--num", 2, "--seed", 0, "--out", tmp_path / "x.npy", timeout=60)
    assert r.returncode == 2 and expect in r.stderr, r.stderr


@pytest.mark.parametrize("content, expect", [
    (b'{"format": "vpsde-bundle", "model": "\xff\xfe"}', "not UTF-8"),
    (b"[" * 100000 + b"]" * 100000, "JSON nested 100000 deep"),
])
def test_hostile_manifest_bytes(bundle, host, tmp_path, content, expect):
    (bundle / "manifest.json").write_bytes(content)
    reseal(bundle)
    if expect == "not UTF-8":
        r = run_host(host / "vpsde-sample", bundle, "--num", 2, "--seed", 0, "--out", tmp_path / "x.npy", timeout=60)
        assert r.returncode == 2 and "manifest.json" in r.stderr  # nlohmann reports invalid UTF-8 as bad JSON
        with pytest.raises(BundleError, match=expect):
            Bundle.load(bundle)
    else:
        _both(bundle, host, tmp_path, expect)


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_manifest_that_is_not_a_regular_file(bundle, host, tmp_path, kind):
    """A FIFO used to hang both hosts; a directory ended in IsADirectoryError."""
    (bundle / "manifest.json").unlink()
    if kind == "directory":
        (bundle / "manifest.json").mkdir()
    else:
        os.mkfifo(bundle / "manifest.json")
    _both(bundle, host, tmp_path, "the manifest is a directory" if kind == "directory" else "the manifest is a FIFO")


@pytest.mark.parametrize("edit, field", [
    (lambda d: d["model"].update(value_range=[0, 1, 2]), "model.value_range"),
    (lambda d: d["model"].update(value_range=[1, -1]), "model.value_range"),
    (lambda d: d["schedule"]["t"].__setitem__(0, float("nan")), "schedule.t"),
    (lambda d: d["graphs"]["em"]["inputs"][0].update(name="x\u001b[2J"), "graphs.em.inputs[0].name"),
])
def test_manifest_values_of_the_wrong_shape_name_the_field(bundle, edit, field):
    edit_manifest(bundle, edit)
    with pytest.raises(BundleError, match=f"field '{field.replace('[', '.').replace(']', '.')}"):
        Bundle.load(bundle)


@pytest.mark.parametrize("value", [1e300, -3.5e38, 2.0**128 - 2.0**103])
def test_a_schedule_value_float32_cannot_hold_is_refused_by_both_hosts(bundle, host, tmp_path, value):
    """Finite in the manifest's float64 but Infinity once the hosts hand it to the graph as float32: Python printed
    numpy's overflow warning and stopped at the first call with a NaN/Inf error; now both refuse it at load. The
    largest magnitude that rounds to a finite float32 still loads."""
    edit_manifest(bundle, lambda d: d["schedule"]["t"].__setitem__(1, value))
    _both(bundle, host, tmp_path, "field 'schedule.t': expected finite float32 numbers")
    edit_manifest(bundle, lambda d: d["schedule"]["t"].__setitem__(1, math.nextafter(2.0**128 - 2.0**103, 0)))
    Bundle.load(bundle)
    r = run_host(host / "vpsde-sample", bundle, "--num", 1, "--seed", 0, "--out", tmp_path / "y.npy", timeout=60)
    assert "schedule.t" not in r.stderr, r.stderr  # past the manifest's checks (the graph may then make NaN)


@pytest.mark.parametrize("edit", [
    lambda d: d["graphs"]["em"]["outputs"][0].update(shape=["batch", 3]),
    lambda d: d["graphs"]["em"]["outputs"][0].update(dtype="float16"),
])
def test_graph_io_that_differs_from_the_manifest_is_refused_at_load(bundle, edit):
    """Used to pass loading and fail inside ONNX Runtime's run."""
    edit_manifest(bundle, edit)
    with pytest.raises(BundleError, match=r"em\.onnx: graph outputs .* do not match 'graphs\.em\.outputs'"):
        Sampler(bundle, progress=False)


@pytest.mark.parametrize("args, expect", [
    (["--num", str(10**12)], "more than this machine's"),
    (["--threads", "100000"], "expected 1..1024"),  # used to segfault after a minute
    (["--first-sample", str(2**64 - 1), "--num", "2"], "passes the last sample index"),
    (["--first-sample", "-1"], "expected 0 <= index < 2^64"),
    (["--expect-digest", "abc"], "expected a bundle digest of 64 hex digits"),
])
def test_sample_arguments_are_one_line_errors(gmm_bundle, tmp_path, args, expect):
    r = subprocess.run([*CLI, "sample", str(gmm_bundle.root), "--out", str(tmp_path / "o"), "--no-progress", *args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and expect in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_inspect_into_a_closed_pipe_is_quiet(gmm_bundle):
    r = subprocess.run(f"{sys.executable} -m vpsde.cli.main inspect {gmm_bundle.root} | head -c 10", shell=True,
                       capture_output=True, text=True, timeout=60)
    assert r.stdout == "bundle    " and "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr


def test_inspect_escapes_control_characters(bundle, capsys):
    edit_manifest(bundle, lambda d: d["model"].update(name="evil\u001b[2J\u001b]0;pwned\u0007"))
    assert main(["inspect", str(bundle)]) == 0
    out = capsys.readouterr().out
    assert "\u001b" not in out and "\u0007" not in out and "evil\\x1b[2J" in out


def test_cpp_memory_errors_are_exit_2(host, gmm_bundle, tmp_path):
    r = run_host(host / "vpsde-sample", gmm_bundle.root, "--num", 2**40, "--batch", 1, "--seed", 0,
                 "--out", tmp_path / "x.npy", timeout=60)
    assert r.returncode == 2 and "more than this machine's" in r.stderr, r.stderr


def test_a_bench_batch_past_memory_is_one_line(gmm_bundle):
    """`vpsde bench --batch 100000000` under a 6 GB address-space limit: ONNX Runtime's allocator failed inside a
    graph call (RuntimeError "std::bad_alloc"), a traceback. Now, wherever the allocation fails (numpy or ONNX
    Runtime), one line naming what to make smaller, exit 2."""
    r = subprocess.run(["bash", "-c", 'ulimit -v 6000000 && exec "$@"', "_", *CLI, "bench", str(gmm_bundle.root),
                        "--batch", "100000000", "--steps", "2", "--iters", "1", "--warmup", "0", "--threads", "1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == "vpsde bench: error: out of memory: use smaller --batch sizes"


@pytest.mark.parametrize("edit, expect", [
    (lambda m: m.update(weights=5), "field 'weights': expected a string"),
    (lambda m: m.update(weights="../../etc/passwd"), "field 'weights': expected a file name beside the config"),
    (lambda m: m.update(time_label=999), "field 'time_label': expected a string"),
    (lambda m: m.update(value_range="0..1"), "field 'value_range'"),
    (lambda m: m.update(unet=[1, 2]), "field 'unet': expected an object"),
])
def test_weights_config_fields_of_the_wrong_type(tmp_path, edit, expect):
    import shutil

    from vpsde.models.shipped import WEIGHTS_DIR

    for f in ("digits16.json", "digits16.safetensors"):
        shutil.copy(WEIGHTS_DIR / f, tmp_path / f)
    meta = json.loads((tmp_path / "digits16.json").read_text())
    edit(meta)
    (tmp_path / "digits16.json").write_text(json.dumps(meta))
    with pytest.raises((ModelSpecError, ValueError), match=expect):
        load_model(f"weights:{tmp_path / 'digits16.json'}", VPSDE())
    r = subprocess.run([*CLI, "export", "--model", f"weights:{tmp_path / 'digits16.json'}", "--out",
                        str(tmp_path / "b")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and expect in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("argv, expect", [
    (["parity", "{b}", "--against", "backend:onnxruntime", "--backends", ","], "--backends ','"),
    (["bench", "{b}", "--backend", ","], "--backend ','"),
    (["bench", "{b}", "--json", "{tmp}"], "is a directory"),
])
def test_empty_backend_lists_and_a_json_directory_are_one_line(gmm_bundle, tmp_path, capsys, argv, expect):
    """`parity --backends ,` raised IndexError, `bench --backend ,` printed an empty table and exited 0, and
    `bench --json DIR` named a temporary file instead of DIR."""
    argv = [a.format(b=gmm_bundle.root, tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expect in err and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


def test_inspect_survives_an_engine_record_of_the_wrong_types(bundle, capsys):
    """An engine record whose targets are numbers made `vpsde inspect` raise TypeError; it is skipped, and
    check_engine calls it unreadable."""
    from vpsde.runtime.tensorrt.cache import EngineKey, check_engine

    engines = bundle / "engines"
    engines.mkdir()
    key = {"graph": "em", "graph_sha256": "0" * 64, "flavor": "tensorrt", "version": "10", "targets": [86, 89],
           "precision": "fp32", "profile": "1:1:1"}
    (engines / "em-0123456789abcdef.json").write_text(json.dumps({"key": key, "plan_sha256": "0" * 64}))
    (engines / "em-0123456789abcdef.plan").write_bytes(b"plan")
    assert main(["inspect", str(bundle)]) == 0
    assert "Traceback" not in capsys.readouterr().err
    good = EngineKey("em", "0" * 64, "tensorrt", "10", ("86",), "fp32", "1:1:1")
    with pytest.raises(BundleError, match="unreadable engine record"):
        check_engine(engines / "em-0123456789abcdef.plan", good)


@pytest.mark.parametrize("shape", [[-1], [0], ["batch", -3]])
def test_both_hosts_refuse_a_non_positive_graph_dimension(bundle, host, tmp_path, shape):
    """The C++ host accepted a schedule input declared [-1] (its own batch marker) that Python refused only when a
    session opened: the same rule, at manifest load, in both."""
    def edit(d):
        spec = next(s for s in d["graphs"]["em"]["inputs"] if s["name"] == "t")
        spec["shape"] = shape
    edit_manifest(bundle, edit)
    _both(bundle, host, tmp_path, "expected positive sizes or symbolic names")


@pytest.mark.parametrize("config, expect", [
    ({"ch_mult": 5}, "ch_mult: expected a list"), ({"attn_resolutions": 5}, "attn_resolutions: expected a list"),
    ({"dropout": "x"}, "dropout: expected a number"), ({"sigma_max": "x"}, "sigma_max: expected a number"),
    ({"centered": "no"}, "centered: expected true or false"),
    ({"resamp_with_conv": "false"}, "resamp_with_conv: expected true or false"),
    ({"nf": 10**6}, "nf: expected an integer in 1..2048"), ({"num_scales": 10**12}, "num_scales: expected an integer"),
    ({"nf": True}, "nf: expected an integer"),
])
def test_score_sde_config_fields_of_the_wrong_type_or_size(config, expect):
    """These ended in a TypeError, were accepted ("no" as true), or reached torch's allocator."""
    from vpsde.models.score_sde import config_from_spec

    with pytest.raises(ValueError, match=expect) as e:
        config_from_spec(json.dumps({"nf": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "image_size": 8, **config}))
    assert "\n" not in str(e.value)
    with pytest.raises(ModelSpecError, match=expect):  # one field: the spec's options are comma-separated
        load_model(f"score_sde-random:config={json.dumps(config).replace(' ', '')}", VPSDE())


@pytest.mark.parametrize("unet, expect", [({"channels": "x"}, "channels: expected an integer"),
                                          ({"channels": 0}, "channels: expected an integer in 1..4096"),
                                          ({"channel_mult": 2}, "channel_mult: expected a list")])
def test_weights_config_unet_fields(tmp_path, unet, expect):
    from vpsde.models.shipped import WEIGHTS_DIR

    meta = json.loads((WEIGHTS_DIR / "digits16.json").read_text())
    meta["unet"].update(unet)
    (tmp_path / "m.json").write_text(json.dumps(meta))
    (tmp_path / meta["weights"]).write_bytes((WEIGHTS_DIR / meta["weights"]).read_bytes())
    with pytest.raises(ModelSpecError, match=expect):
        load_model(f"weights:{tmp_path / 'm.json'}", VPSDE())


@pytest.mark.parametrize("tensor, expect", [("sparse", "dense real tensor"), ("complex-nan", "dense real tensor"),
                                            ("int-key", "dense real tensor")])
def test_checkpoint_tensors_must_be_dense_real_and_named(tmp_path, tensor, expect):
    import torch

    from vpsde.models.score_sde_checkpoint import CheckpointError, network_state
    from vpsde.models.score_sde import ScoreSdeConfig, ScoreSdeNet

    net = ScoreSdeNet(ScoreSdeConfig(nf=32, ch_mult=(1, 2), num_res_blocks=1, image_size=8))
    model = {f"module.{k}": v for k, v in net.state_dict().items()}
    first = next(iter(model))
    if tensor == "sparse":
        model[first] = model[first].to_sparse()
    elif tensor == "complex-nan":
        model[first] = torch.full(model[first].shape, complex(float("nan"), 0))
    else:
        model[7] = model.pop(first)
    with pytest.raises(CheckpointError, match=expect):
        network_state({"model": model}, net, tmp_path / "c.pth", ema=False)


def test_an_output_dtype_the_graph_does_not_have_is_refused_by_both_hosts(bundle, host, tmp_path, capsys):
    """A re-signed manifest declaring x_next float16 over a float32 graph: the C++ host ran it (it checked input
    dtypes only); both refuse it now, Python when the session opens, C++ at manifest load."""
    def edit(d):
        next(o for o in d["graphs"]["em"]["outputs"] if o["name"] == "x_next")["dtype"] = "float16"
    edit_manifest(bundle, edit)
    assert main(["sample", str(bundle), "--num", "2", "--out", str(tmp_path / "o")]) == 2
    assert "do not match 'graphs.em.outputs'" in capsys.readouterr().err
    r = run_host(host / "vpsde-sample", bundle, "--num", 2, "--out", tmp_path / "x.npy", timeout=60)
    assert r.returncode == 2 and "graphs.em.outputs[0].dtype" in r.stderr and "float32 graph IO" in r.stderr, r.stderr


@pytest.mark.parametrize("edit, kind", [
    (lambda d: d["graphs"]["em"]["outputs"][0]["shape"].__setitem__(0, 1), "outputs"),  # [batch, 2] declared [1, 2]
    (lambda d: d["graphs"]["em"]["outputs"][1].update(shape=["batch"]), "outputs"),       # another rank
    (lambda d: d["graphs"]["em"]["inputs"][1].update(shape=[2]), "inputs"),  # t: [batch] declared [2]
])
def test_graph_io_the_file_does_not_have_is_refused_by_both_hosts(bundle, host, tmp_path, capsys, edit, kind):
    """A re-signed manifest whose declared IO differs from the graph's in a fixed size or a rank: Python refused it
    when the session opened, the C++ host compared only the number of inputs and outputs and sampled (found by
    feeding both hosts randomly edited manifests). Both now apply the same rule."""
    edit_manifest(bundle, edit)
    assert main(["sample", str(bundle), "--num", "2", "--out", str(tmp_path / "o")]) == 2
    assert f"do not match 'graphs.em.{kind}'" in capsys.readouterr().err
    r = run_host(host / "vpsde-sample", bundle, "--num", 2, "--out", tmp_path / "x.npy", timeout=60)
    assert r.returncode == 2 and f"graphs.em.{kind}" in r.stderr, r.stderr  # t's [batch]: a manifest rule in C++
    assert not (tmp_path / "x.npy").exists()


@pytest.fixture(scope="module")
def rebuildable(tmp_path_factory):
    """Small bundles whose sampler options the eager reference rebuilds from sampler.params."""
    from vpsde.export import export_bundle

    root, gmm = tmp_path_factory.mktemp("rebuild"), load_model("gmm:dim=2,components=2", VPSDE())
    return {sampler: export_bundle(gmm, root / sampler, sampler=sampler, steps=4, grid="uniform", log=lambda _: None)
            for sampler in ("unipc", "pc", "likelihood")}


@pytest.mark.parametrize("sampler, edit, expect", [
    ("unipc", lambda d: d["sampler"]["params"].update(order=7), "order must be one of"),
    ("unipc", lambda d: d["sampler"]["params"].update(order=0), "order must be one of"),
    ("unipc", lambda d: d["sampler"].update(grid="bogus"), "runs on the grids"),
    ("pc", lambda d: d["sampler"]["params"].update(snr="a"), "'sampler.params'"),
    ("pc", lambda d: d["sampler"]["params"].update(coupling="zzz"), "coupling must be one of"),
    ("likelihood", lambda d: d["sampler"]["params"].update(probes=0), "probes must be 1.."),
    ("likelihood", lambda d: d["sampler"]["params"].update(divergence="q"), "divergence must be one of"),
    ("unipc", lambda d: d["sde"].update(std_formula="zz"), "field 'sde'"),
])
def test_sampler_options_the_eager_reference_cannot_rebuild_are_one_line(rebuildable, tmp_path, capsys, sampler,
                                                                         edit, expect):
    """`vpsde parity --against eager` rebuilds the steps from sampler.params and sde: a (resealed) bundle whose
    values the builders refuse ended in a ValueError or TypeError traceback; probes=0 and order=0 were even taken
    as the defaults. Now: exit 2, one line naming the manifest and the field, the builder's reason."""
    bundle = copy_bundle(rebuildable[sampler], tmp_path / "b")
    edit_manifest(bundle, edit)
    assert main(["parity", str(bundle), "--against", "eager", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and expect in err and str(bundle / "manifest.json") in err, err


@pytest.mark.parametrize("source", ["gmm:dim=4,components=100000000", "gmm:dim=2,zz=1", "gmmx", "gmm:dim=2,seed=9"])
def test_the_quality_yardstick_rebuilds_only_the_mixture_the_bundle_holds(gmm_bundle, tmp_path, capsys, source):
    """`vpsde parity --quality` built its mixture from model.source without the eager side's checks: a component
    count of 1e8 tried to allocate it (out of memory), a bad spec was a ModelSpecError traceback, and another seed
    would have scored against the wrong mixture. Now: one line naming the field, before any comparison runs."""
    bundle = copy_bundle(gmm_bundle, tmp_path / "b")
    edit_manifest(bundle, lambda d: d["model"].update(source=source))
    assert main(["parity", str(bundle), "--against", str(gmm_bundle.root), "--no-gains", "--quality",
                 "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1, captured
    assert "field 'model.source'" in captured.err and "--quality has no yardstick" in captured.err
