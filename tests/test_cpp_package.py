"""The C++ host as a library: built against dependency prefixes (nothing installed on the system), installed with
`cmake --install`, found by a separate project with `find_package(vpsde)` (hosts/cpp/examples/minimal), and
giving the Python runtime's samples bit for bit; CTest's known answers; one Sampler shared by threads."""

import subprocess
from pathlib import Path

import numpy as np

from vpsde.runtime import Sampler

ROOT = Path(__file__).parent.parent


def _run(*args, cwd=None, timeout=600):
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=cwd, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(map(str, args))}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


def test_ctest_and_threads(host, gmm_bundle):
    r = _run("ctest", "--output-on-failure", cwd=host)
    assert "100% tests passed" in r.stdout
    r = _run(host / "vpsde-thread-test", gmm_bundle.root)
    assert "0 mismatching results" in r.stdout


def test_installed_package_builds_a_consumer_that_matches_python(host, gmm_bundle, tmp_path):
    prefix = tmp_path / "prefix"
    _run("cmake", "--install", host, "--prefix", prefix)
    assert (prefix / "lib" / "cmake" / "vpsde" / "vpsdeConfig.cmake").is_file()
    assert (prefix / "include" / "vpsde" / "sampler.hpp").is_file() and (prefix / "bin" / "vpsde-sample").is_file()
    ort = ROOT / "build" / "deps" / "onnxruntime"
    build = tmp_path / "example"
    _run("cmake", "-S", ROOT / "hosts" / "cpp" / "examples" / "minimal", "-B", build,
         f"-DCMAKE_PREFIX_PATH={prefix};{ort}")
    _run("cmake", "--build", build)
    r = _run(build / "sample_bundle", gmm_bundle.root, 6, 11, tmp_path / "x.npy")
    assert f"digest {gmm_bundle.digest}" in r.stdout
    want = Sampler(gmm_bundle, progress=False, threads=1).sample(6, seed=11)
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), want)
    import tomllib

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    r = _run(prefix / "bin" / "vpsde-sample", "--version")
    assert r.stdout.startswith(f"vpsde-sample {version} "), r.stdout  # one version, one source


def test_the_install_is_relocatable(host, gmm_bundle, tmp_path):
    """The installed vpsde-sample loaded libonnxruntime from the build tree (its RUNPATH named build/deps): moved
    anywhere, the install runs on its own libraries, and nothing of the build tree is named."""
    import shutil

    prefix = tmp_path / "prefix"
    _run("cmake", "--install", host, "--prefix", prefix)
    moved = tmp_path / "elsewhere" / "vpsde"
    moved.parent.mkdir()
    shutil.move(prefix, moved)
    exe = moved / "bin" / "vpsde-sample"
    runpath = _run("readelf", "-d", exe).stdout
    assert "build" not in runpath and "$ORIGIN/../lib" in runpath, runpath
    ldd = _run("ldd", exe).stdout
    line = next(ln for ln in ldd.splitlines() if "libonnxruntime.so" in ln)
    assert f"{moved}/bin/../lib/libonnxruntime.so" in line and "build" not in line, ldd
    _run(exe, gmm_bundle.root, "--num", 3, "--seed", 2, "--out", tmp_path / "x.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"),
                                  Sampler(gmm_bundle, progress=False, threads=1).sample(3, seed=2))


def test_no_onnx_runtime_log_line_before_the_error(host, gmm_bundle, tmp_path):
    """A graph ONNX Runtime cannot load: the first line on stderr is vpsde's, not ORT's own log."""
    import shutil

    from onnx import TensorProto, helper

    from conftest import edit_manifest

    root = tmp_path / "b"
    shutil.copytree(gmm_bundle.root, root, ignore=shutil.ignore_patterns("engines"))
    graph = helper.make_graph([helper.make_node("NoSuchOp", ["x"], ["x_next"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])],
                              [helper.make_tensor_value_info("x_next", TensorProto.FLOAT, ["batch", 2])])
    data = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()
    (root / "em.onnx").write_bytes(data)
    import hashlib

    edit_manifest(root, lambda d: d["graphs"]["em"].update(sha256=hashlib.sha256(data).hexdigest()))
    r = subprocess.run([str(host / "vpsde-sample"), str(root), "--num", "2", "--seed", "0", "--out",
                        str(tmp_path / "x.npy")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.splitlines()[0].startswith("vpsde-sample: error:"), r.stderr
