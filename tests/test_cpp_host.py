"""The C++ host (hosts/cpp) against the Python runtime: same noise, same samples, same errors.

Built by hosts/cpp/build.sh (Debian's nlohmann-json, trixie's ONNX Runtime headers, the onnxruntime wheel's
library). Skips only when there is no C++ compiler or cmake; a failing build fails the test.
Bound for samples: max abs <= 1e-6 (DESIGN: same graph, same ORT library, same float32 noise; measured: 0,
bit-identical, with one intra-op thread on both sides)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import reseal, run_host as run, small_conv

from vpsde.export import VPSDE, export_bundle, load_model
from vpsde.runtime import Sampler
from vpsde.runtime.bundle import sha256_file
from vpsde.runtime.likelihood import dequantize
from vpsde.runtime.noise import philox_normal

ROOT = Path(__file__).parent.parent
KAT = ROOT / "tests" / "data" / "philox4x32_10_kat.json"


def test_philox_known_answers_in_cpp(host):
    r = run(host / "vpsde-noise", "--kat", KAT)
    assert r.returncode == 0 and "3 vectors, 0 mismatching words" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("seed, call, first, num, numel", [
    (0, 0, 0, 4, 256), (2**40 + 7, 3, 2**32 - 2, 5, 13), (2**64 - 1, 999, 12345, 3, 2)])
def test_cpp_noise_is_bit_identical_to_python(host, tmp_path, seed, call, first, num, numel):
    out = tmp_path / "z.npy"
    r = run(host / "vpsde-noise", "--seed", seed, "--call", call, "--first-sample", first, "--num", num,
            "--numel", numel, "--out", out)
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(np.load(out), philox_normal(seed, call, first, num, (numel,)))


@pytest.fixture(scope="module")
def shipped_bundle(tmp_path_factory):
    return export_bundle(load_model("digits", VPSDE(std_formula="diffusers")),
                         tmp_path_factory.mktemp("cpp") / "digits-em50", steps=50, value_range=(-1, 1), log=lambda _: None)


@pytest.mark.parametrize("which", ["shipped", "gmm"])
def test_cpp_samples_equal_python_runtime(host, tmp_path, which, request):
    bundle = request.getfixturevalue("shipped_bundle" if which == "shipped" else "gmm_bundle")
    out = tmp_path / "x.npy"
    r = run(host / "vpsde-sample", bundle.root, "--num", 6, "--seed", 42, "--first-sample", 10, "--threads", 1, "--out", out)
    assert r.returncode == 0, r.stderr
    cpp = np.load(out)
    py = Sampler(bundle, progress=False, threads=1).sample(6, seed=42, first_sample=10)
    assert cpp.shape == py.shape and np.isfinite(cpp).all()
    assert np.abs(cpp - py).max() <= 1e-6


@pytest.mark.parametrize("sampler, steps, options", [
    ("pc", 25, {"corrector_steps": 2}),  # two graphs, a repeated call, two noise draws per step
    ("dpmpp-2m", 12, {}),                # host-carried state (x0_prev <- x0), no noise after the prior
    ("ode-heun", 8, {}),                 # schedule arrays by name (t, dt, t_next)
    ("dpmpp-3m", 10, {}),                # two states, one of them passed through (x0_prev2 <- x0_prev_out)
    ("dpmpp-2m-sde", 6, {}),             # state and a noise input in one graph
    ("edm-heun", 4, {}),                 # the edm grid, two model calls per graph call
    ("ipndm", 6, {}),                    # three states, two of them passed through
    ("unipc", 6, {}),                    # four states, one of them the corrected x (x_prev <- x_c)
    ("em", 6, {"precision": "int8"}),    # QDQ int8 convolutions (ORT's int8 kernels in both hosts)
])
def test_cpp_runs_every_sampler_like_python(host, tmp_path, sampler, steps, options):
    """The v2 contract (schedule by input name, noise inputs, state, repeats) gives the same samples in C++."""
    bundle = export_bundle(load_model("digits", VPSDE()), tmp_path / sampler, sampler=sampler, steps=steps,
                           log=lambda _: None, **options)
    out = tmp_path / "x.npy"
    r = run(host / "vpsde-sample", bundle.root, "--num", 4, "--seed", 9, "--threads", 1, "--out", out)
    assert r.returncode == 0, r.stderr
    py = Sampler(bundle, progress=False, threads=1).sample(4, seed=9)
    assert np.isfinite(py).all() and np.abs(np.load(out) - py).max() <= 1e-6


def test_cpp_inpainting_equals_python(host, tmp_path):
    """Conditioning inputs from .npy (known: one row per sample; mask: one row shared by all), batches of 2."""
    bundle = export_bundle(load_model("gmm:dim=3", VPSDE()), tmp_path / "inp", sampler="inpaint", steps=20,
                           log=lambda _: None)
    rs = np.random.default_rng(5)
    known = rs.uniform(-1, 1, (5, 3)).astype(np.float32)
    mask = np.array([1, 0, 1], np.float32)
    np.save(tmp_path / "known.npy", known)
    np.save(tmp_path / "mask.npy", mask)
    out = tmp_path / "x.npy"
    r = run(host / "vpsde-sample", bundle.root, "--num", 5, "--seed", 4, "--batch", 2, "--threads", 1,
            "--cond", f"known={tmp_path / 'known.npy'}", "--cond", f"mask={tmp_path / 'mask.npy'}", "--out", out)
    assert r.returncode == 0, r.stderr
    py = Sampler(bundle, progress=False, threads=1).sample(5, seed=4, batch_size=2,
                                                           conditioning={"known": known, "mask": mask})
    assert np.isfinite(py).all() and np.abs(np.load(out) - py).max() <= 1e-6
    r = run(host / "vpsde-sample", bundle.root, "--num", 2, "--seed", 0, "--out", tmp_path / "y.npy")
    assert r.returncode == 2 and "conditioning inputs known, mask, got none" in r.stderr
    assert not (tmp_path / "y.npy").exists()
    np.save(tmp_path / "bad.npy", known.astype(np.float64))
    r = run(host / "vpsde-sample", bundle.root, "--num", 2, "--seed", 0, "--cond", f"known={tmp_path / 'bad.npy'}",
            "--cond", f"mask={tmp_path / 'mask.npy'}", "--out", tmp_path / "y.npy")
    assert r.returncode == 2 and "bad.npy: expected float32" in r.stderr


@pytest.mark.parametrize("model, divergence, batch", [
    ("gmm:dim=4,components=5,full=1", "exact", 3),  # 4 JVPs per field evaluation, batches of 3
    ("gmm:dim=3", "hutchinson", 2),                 # Rademacher probes from the host noise, per sample index
])
def test_cpp_log_likelihood_equals_python(host, tmp_path, model, divergence, batch):
    """A likelihood bundle (schema v3) in C++: the program from the points, the probes per sample index, rows summed in
    float64 in element order: the same log p as Sampler.log_likelihood, bit for bit (one intra-op thread each)."""
    bundle = export_bundle(load_model(model, VPSDE()), tmp_path / "lik", sampler="likelihood", steps=3,
                           divergence=divergence, log=lambda _: None)
    points = np.random.default_rng().standard_normal((5, *bundle.manifest.model.sample_shape)).astype(np.float32)
    np.save(tmp_path / "points.npy", points)
    out = tmp_path / "logp.npy"
    r = run(host / "vpsde-sample", bundle.root, "--data", tmp_path / "points.npy", "--seed", 6, "--first-sample", 9,
            "--batch", batch, "--threads", 1, "--out", out)
    assert r.returncode == 0, r.stderr
    py = Sampler(bundle, progress=False, threads=1).log_likelihood(points, 6, first_sample=9, batch_size=batch)
    cpp = np.load(out)
    assert cpp.dtype == np.float64 and np.isfinite(py).all()
    np.testing.assert_array_equal(cpp, py)
    wide = points.astype(np.float64) + np.random.default_rng().uniform(-1e-9, 1e-9, points.shape)  # between floats
    np.save(tmp_path / "wide.npy", wide)
    r = run(host / "vpsde-sample", bundle.root, "--data", tmp_path / "wide.npy", "--seed", 6, "--first-sample", 9,
            "--batch", batch, "--threads", 1, "--out", out)
    assert r.returncode == 0, r.stderr
    narrowed = Sampler(bundle, progress=False, threads=1).log_likelihood(wide.astype(np.float32), 6, first_sample=9,
                                                                          batch_size=batch)
    np.testing.assert_array_equal(np.load(out), narrowed)  # float64 points: rounded to float32 as numpy rounds them
    for args, message in [
        (["--num", 2], "computes likelihoods"),
        (["--data", tmp_path / "points.npy", "--num", 2], "--data and --num"),
    ]:
        r = run(host / "vpsde-sample", bundle.root, *args, "--out", tmp_path / "y.npy")
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    for name, bad, message in [("nan", np.where(np.arange(len(points))[:, None] == 3, np.nan, points), "row 3 holds NaN"),
                               ("shape", points[:, ..., :1], "expected points [N, "),
                               ("huge", np.where(np.arange(len(points))[:, None] == 2, 1e300, points.astype(np.float64)),
                                "row 2 holds NaN"),  # float64 past float32's range: infinity, as numpy rounds it
                               ("i64", np.arange(points.size).reshape(points.shape),
                                "expected float32 or float64 points ('<f4', '<f8') or uint8 images ('|u1'), got '<i8'")]:
        np.save(tmp_path / f"{name}.npy", bad)
        r = run(host / "vpsde-sample", bundle.root, "--data", tmp_path / f"{name}.npy", "--out", tmp_path / "y.npy")
        assert r.returncode == 2 and message in r.stderr, r.stderr
    assert not (tmp_path / "y.npy").exists()


def test_cpp_log_likelihood_of_images_equals_python(host, tmp_path):
    """uint8 images as --data: dequantized in C++ (noise call 0 of each input's sample index, std::erf) into the
    bundle's value range, then scored: the same log p as the Python runtime's dequantize + log_likelihood, bit for
    bit. Images need a value range: a bundle without one refuses them in one line."""
    bundle = export_bundle(small_conv(), tmp_path / "lik", sampler="likelihood", steps=2, value_range=(-1, 1),
                           log=lambda _: None)
    shape = bundle.manifest.model.sample_shape
    pixels = np.random.default_rng().integers(0, 256, (5, *shape), dtype=np.uint8)
    pixels[0] = 0  # both ends of the range: u in (0, 1) keeps the points inside [lo, hi]
    pixels[1] = 255
    np.save(tmp_path / "images.npy", pixels)
    out = tmp_path / "logp.npy"
    r = run(host / "vpsde-sample", bundle.root, "--data", tmp_path / "images.npy", "--seed", 4, "--first-sample", 3,
            "--batch", 2, "--threads", 1, "--out", out)
    assert r.returncode == 0, r.stderr
    points = dequantize(pixels, (-1.0, 1.0), 4, 3, bundle.manifest.noise.generator)
    py = Sampler(bundle, progress=False, threads=1).log_likelihood(points, 4, first_sample=3, batch_size=2)
    assert np.isfinite(py).all()
    np.testing.assert_array_equal(np.load(out), py)
    np.save(tmp_path / "small.npy", pixels[:, :, :4])
    r = run(host / "vpsde-sample", bundle.root, "--data", tmp_path / "small.npy", "--out", tmp_path / "y.npy")
    assert r.returncode == 2 and "small.npy: expected uint8 images [N, 1, 8, 8]" in r.stderr, r.stderr
    header_bytes = (tmp_path / "images.npy").read_bytes()
    (tmp_path / "bad.npy").write_bytes(header_bytes.replace(b"(5, 1, 8, 8)", b"(5, x, 8, 8)", 1))
    r = run(host / "vpsde-sample", bundle.root, "--data", tmp_path / "bad.npy", "--out", tmp_path / "y.npy")
    assert r.returncode == 2 and "bad.npy: bad shape in the .npy header: (5, x, 8, 8)" in r.stderr, r.stderr
    (tmp_path / "short.npy").write_bytes(header_bytes[:-7])
    r = run(host / "vpsde-sample", bundle.root, "--data", tmp_path / "short.npy", "--out", tmp_path / "y.npy")
    assert r.returncode == 2 and "short.npy: truncated .npy data" in r.stderr, r.stderr

    no_range = export_bundle(load_model("gmm:dim=3", VPSDE()), tmp_path / "gmm", sampler="likelihood", steps=2,
                             log=lambda _: None)
    np.save(tmp_path / "points.npy", pixels.reshape(len(pixels), -1)[:, :3].copy())
    r = run(host / "vpsde-sample", no_range.root, "--data", tmp_path / "points.npy", "--out", tmp_path / "y.npy")
    assert r.returncode == 2 and "images need the model's value range" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "y.npy").exists()


def test_cpp_refuses_likelihood_data_for_a_sampling_bundle(host, tmp_path, gmm_bundle):
    np.save(tmp_path / "points.npy", np.ones((2, *gmm_bundle.manifest.model.sample_shape), np.float32))
    r = run(host / "vpsde-sample", gmm_bundle.root, "--data", tmp_path / "points.npy", "--out", tmp_path / "y.npy")
    assert r.returncode == 2 and "--sampler likelihood" in r.stderr and not (tmp_path / "y.npy").exists()


def test_cpp_batch_size_invariance(host, tmp_path, gmm_bundle):
    outs = []
    for batch in (3, 8):
        out = tmp_path / f"b{batch}.npy"
        r = run(host / "vpsde-sample", gmm_bundle.root, "--num", 8, "--seed", 1, "--batch", batch, "--out", out)
        assert r.returncode == 0, r.stderr
        outs.append(np.load(out))
    np.testing.assert_array_equal(*outs)


def _copy(bundle, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(bundle.root, dst)
    return dst


def _edit(root, edit):
    data = json.loads((root / "manifest.json").read_text())
    edit(data)
    (root / "manifest.json").write_text(json.dumps(data))
    reseal(root)


@pytest.mark.parametrize("case, expect", [
    ("missing_graph", "em.onnx: graph file named by 'graphs.em.file'"),
    ("schema_version", "field 'schema_version': this host reads schema versions 1..3, the bundle has 7"),
    ("sha_mismatch", "em.onnx: sha256 does not match 'graphs.em.sha256'"),
    ("shape_mismatch", "field 'graphs.em.inputs[0].shape': expected [batch, 2]"),
    ("not_onnx", "em.onnx: graph 'em' is not an ONNX model"),
    ("ort_status", "ONNX Runtime could not load graph 'em'"),
    ("not_json", "not valid JSON"),
    ("bf16_on_cpu", "field 'model.precision' is \"bf16\"; ONNX Runtime's CPU provider has no bfloat16 kernels"),
])
def test_cpp_errors_are_clear(host, tmp_path, gmm_bundle, case, expect):
    root = _copy(gmm_bundle, tmp_path)
    if case == "missing_graph":
        (root / "em.onnx").unlink()
    elif case == "schema_version":
        _edit(root, lambda d: d.update(schema_version=7))
    elif case == "sha_mismatch":
        with open(root / "em.onnx", "ab") as f:
            f.write(b"\0")
    elif case == "shape_mismatch":
        _edit(root, lambda d: d["model"].update(sample_shape=[2]) or d["graphs"]["em"]["inputs"][0].update(shape=["batch", 3]))
    elif case in ("not_onnx", "ort_status"):
        from onnx import TensorProto, helper

        graph = helper.make_graph([helper.make_node("NoSuchOp", ["x"], ["x_next"])], "g",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])],
                                  [helper.make_tensor_value_info("x_next", TensorProto.FLOAT, ["batch", 2])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()
        (root / "em.onnx").write_bytes(b"not an onnx model" if case == "not_onnx" else model)
        _edit(root, lambda d: d["graphs"]["em"].update(sha256=sha256_file(root / "em.onnx")))
    elif case == "not_json":
        (root / "manifest.json").write_text("{oops")
        reseal(root)
    elif case == "bf16_on_cpu":
        _edit(root, lambda d: d["model"].update(precision="bf16"))
    r = run(host / "vpsde-sample", root, "--num", 2, "--seed", 0, "--out", tmp_path / "x.npy")
    assert r.returncode == 2, (r.returncode, r.stderr)  # a message and exit 2, never a crash (negative code)
    assert expect in r.stderr and "vpsde-sample: error:" in r.stderr
    assert not (tmp_path / "x.npy").exists()


def test_cpp_bad_arguments(host, gmm_bundle, tmp_path):
    r = run(host / "vpsde-sample", gmm_bundle.root, "--num", "x", "--seed", 0, "--out", tmp_path / "x.npy")
    assert r.returncode == 2 and "--num: expected a non-negative integer" in r.stderr
    r = run(host / "vpsde-sample", gmm_bundle.root, "--num", 2, "--seed", 0, "--provider", "tpu", "--out", tmp_path / "x.npy")
    assert r.returncode == 2 and "unknown provider 'tpu'" in r.stderr
    r = run(host / "vpsde-sample", gmm_bundle.root, "--num", 2, "--seed", 0, "--provider", "cuda", "--out", tmp_path / "x.npy")
    assert r.returncode == 2 and "provider 'cuda'" in r.stderr  # this ORT build has no CUDA: a message, not a crash


def test_cpp_teardown_is_clean_over_many_runs(host, tmp_path):
    """Two sessions, bindings and device buffers released in order: ~Sampler used to free the allocator before
    the IO bindings that still held its buffers, and 1 run in 20-40 crashed at exit (SIGSEGV in ORT's free)."""
    bundle = export_bundle(load_model("digits", VPSDE()), tmp_path / "pc", sampler="pc", steps=3, grid="uniform",
                           corrector_steps=2,
                           log=lambda _: None)
    codes = [run(host / "vpsde-sample", bundle.root, "--num", 4, "--seed", i, "--threads", 1,
                 "--out", tmp_path / "x.npy").returncode for i in range(40)]
    assert codes == [0] * 40, codes


def test_seed_defaults_to_0_as_in_python(host, gmm_bundle, tmp_path):
    """--seed was required in C++ and defaulted to 0 in Python: one default."""
    from vpsde.runtime import Sampler

    r = run(host / "vpsde-sample", gmm_bundle.root, "--num", 3, "--threads", 1, "--out", tmp_path / "x.npy")
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"),
                                  Sampler(gmm_bundle, progress=False, threads=1).sample(3))
