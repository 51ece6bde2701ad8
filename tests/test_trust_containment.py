"""Trust boundary, containment: no path from a bundle leaves it, every byte that changes samples is covered by the
bundle digest, and the bytes that are checked are the bytes that run (Python runtime, CLI, TensorRT build, C++).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess

import numpy as np
import onnx
import pytest
from conftest import copy_bundle, edit_manifest, reseal, run_host
from onnx import TensorProto, numpy_helper

from vpsde.cli.main import main
from vpsde.runtime import Bundle, BundleError, Sampler
from vpsde.runtime.bundle import write_sums


@pytest.fixture
def bundle(gmm_bundle, tmp_path):
    return copy_bundle(gmm_bundle, tmp_path / "b")


def _cpp(host, root, tmp_path, *extra):
    return run_host(host / "vpsde-sample", root, "--num", 2, "--seed", 0, "--out", tmp_path / "x.npy", *extra)


# -- names from the manifest become file names only when they are plain ------------------------------------
@pytest.mark.parametrize("key", ["../../pwn", "a/b", ".hidden", "/abs"])
def test_graph_keys_must_be_plain_names(bundle, host, tmp_path, key):
    def rename(d):
        d["graphs"][key] = d["graphs"].pop("em")
        d["sampler"]["program"][0]["graph"] = key
    edit_manifest(bundle, rename)
    with pytest.raises(BundleError, match="plain name"):
        Bundle.load(bundle)
    r = _cpp(host, bundle, tmp_path)
    assert r.returncode == 2 and "plain name" in r.stderr
    assert not (tmp_path / "pwn.plan").exists() and not (tmp_path / "x.npy").exists()


def test_build_never_writes_through_a_symlinked_engine_dir_or_lock(bundle, tmp_path, capsys):
    """`vpsde build` as root: an `engines` symlink or an `engines/.lock` symlink pointing outside is refused and
    nothing is created where it points."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (bundle / "engines").symlink_to(outside)
    assert main(["build", str(bundle), "--batch", "1:2:4", "--target-cc", "SM86"]) == 2
    assert "engine cache is a symlink" in capsys.readouterr().err
    assert list(outside.iterdir()) == []
    (bundle / "engines").unlink()
    (bundle / "engines").mkdir()
    (bundle / "engines" / ".lock").symlink_to(tmp_path / "created-by-root")
    assert main(["build", str(bundle), "--batch", "1:2:4", "--target-cc", "SM86"]) == 2
    assert "lock is a symlink" in capsys.readouterr().err
    assert not (tmp_path / "created-by-root").exists()


# -- graph files: inside the bundle, no oracle for files the manifest did not name --------------------------
def test_a_graph_symlinked_outside_the_bundle_is_refused(bundle, host, tmp_path, capsys):
    """A graph file that is a symlink to a file outside is not loaded (Python and C++), `inspect` does not call it
    verified, and no error prints the target's sha256 (which would be an oracle for any readable file)."""
    secret = tmp_path / "secret.onnx"
    os.replace(bundle / "em.onnx", secret)
    (bundle / "em.onnx").symlink_to(secret)
    target_sha = hashlib.sha256(secret.read_bytes()).hexdigest()
    with pytest.raises(BundleError, match="symlink that leaves the bundle"):
        Bundle.load(bundle)
    assert main(["inspect", str(bundle)]) == 2
    out = capsys.readouterr()
    assert "verified" not in out.out and "symlink that leaves the bundle" in out.err and target_sha not in out.err
    r = _cpp(host, bundle, tmp_path)
    assert r.returncode == 2 and "symlink that leaves the bundle" in r.stderr and target_sha not in r.stderr

    (bundle / "em.onnx").unlink()  # a different file outside: the mismatch message names no hash of it
    secret.write_bytes(b"whatever the attacker wants hashed")
    (bundle / "em.onnx").symlink_to(secret)
    with pytest.raises(BundleError) as e:
        Bundle.load(bundle)
    assert hashlib.sha256(secret.read_bytes()).hexdigest() not in str(e.value)


def test_a_symlink_inside_the_bundle_is_followed_and_checked(bundle):
    os.replace(bundle / "em.onnx", bundle / "real.bin")
    (bundle / "em.onnx").symlink_to("real.bin")
    Bundle.load(bundle)  # resolves inside: allowed, and its bytes are checked as usual


def _external_data_graph(bundle, location: str) -> None:
    """Rewrite the bundle's em graph so that its first initializer lives in external data at ``location`` (a
    producer's bundle, resealed: only the external data is wrong)."""
    model = onnx.load(str(bundle / "em.onnx"))
    init = next(t for t in model.graph.initializer if numpy_helper.to_array(t).size >= 2)
    data = numpy_helper.to_array(init).tobytes()
    (bundle / "weights.bin").write_bytes(data)
    init.ClearField("raw_data")
    init.ClearField("float_data")
    init.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", str(len(data)))):
        entry = init.external_data.add()
        entry.key, entry.value = k, v
    (bundle / "em.onnx").write_bytes(model.SerializeToString())
    edit_manifest(bundle, lambda d: d["graphs"]["em"].update(sha256=hashlib.sha256((bundle / "em.onnx").read_bytes()).hexdigest()))


@pytest.mark.parametrize("location", ["/etc/passwd", "../outside.bin", "weights.bin"])
def test_external_data_is_refused_by_every_loader(bundle, host, tmp_path, location, capsys):
    """Export never writes external data; a graph that has some (outside the bundle, or inside it where no sha256
    covers it) is refused by the Python loader, `vpsde build` and the C++ host."""
    (tmp_path / "outside.bin").write_bytes(np.ones(64, np.float32).tobytes())
    _external_data_graph(bundle, location)
    with pytest.raises(BundleError, match="external data"):
        Bundle.load(bundle)
    assert main(["build", str(bundle), "--batch", "1:2:4", "--target-cc", "SM86"]) == 2
    assert "external data" in capsys.readouterr().err
    assert not (bundle / "engines").exists() or not list((bundle / "engines").glob("*.plan"))
    r = _cpp(host, bundle, tmp_path)
    assert r.returncode == 2 and "external data" in r.stderr, r.stderr
    assert not (tmp_path / "x.npy").exists()


def test_a_graph_swapped_after_loading_is_not_run(bundle, tmp_path):
    """Between the check and the session, the file is replaced by another valid graph: the session is made from
    bytes that are checked again, so the swap is refused instead of run."""
    loaded = Bundle.load(bundle)
    other = copy_bundle(loaded, tmp_path / "other")
    model = onnx.load(str(other / "em.onnx"))
    model.producer_version = "swapped"
    onnx.save(model, str(bundle / "em.onnx"))
    with pytest.raises(BundleError, match="sha256 does not match 'graphs.em.sha256'"):
        Sampler(loaded, progress=False)


# -- one digest over the manifest and every graph ----------------------------------------------------------
def test_an_edited_schedule_is_caught_by_the_digest_in_both_hosts(bundle, host, tmp_path, capsys):
    """`sqrt_neg_dt = 1e30` edited into the manifest used to run with exit 0; now both hosts refuse it."""
    edit_manifest(bundle, lambda d: d["schedule"]["sqrt_neg_dt"].__setitem__(3, 1e30), seal=False)
    with pytest.raises(BundleError, match="edited after export"):
        Bundle.load(bundle)
    assert main(["sample", str(bundle), "--num", "2", "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "edited after export" in capsys.readouterr().err
    r = _cpp(host, bundle, tmp_path)
    assert r.returncode == 2 and "edited after export" in r.stderr


def test_digest_is_shown_pinned_and_recorded_with_engines(gmm_bundle, bundle, host, tmp_path, capsys):
    b = Bundle.load(bundle)
    sums = (bundle / "SHA256SUMS").read_bytes()
    assert b.digest == hashlib.sha256(sums).hexdigest() == gmm_bundle.digest
    # coreutils can check a bundle without vpsde
    r = subprocess.run(["sha256sum", "--check", "--strict", "SHA256SUMS"], cwd=bundle, capture_output=True, text=True)
    assert r.returncode == 0 and "manifest.json: OK" in r.stdout and "em.onnx: OK" in r.stdout
    assert main(["inspect", str(bundle)]) == 0
    assert f"digest      {b.digest}" in capsys.readouterr().out
    assert main(["inspect", str(bundle), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["digest"] == b.digest
    wrong = "0" * 64
    assert main(["sample", str(bundle), "--num", "2", "--expect-digest", wrong, "--out", str(tmp_path / "o")]) == 2
    assert "not the bundle you pinned" in capsys.readouterr().err
    assert main(["sample", str(bundle), "--num", "2", "--expect-digest", b.digest, "--no-progress",
                 "--out", str(tmp_path / "o")]) == 0
    assert str(np.load(tmp_path / "o" / "samples.npz")["bundle_digest"]) == b.digest
    r = _cpp(host, bundle, tmp_path, "--expect-digest", wrong)
    assert r.returncode == 2 and "not the bundle you pinned" in r.stderr
    r = _cpp(host, bundle, tmp_path, "--expect-digest", b.digest)
    assert r.returncode == 0, r.stderr
    # an engine built from the bundle records its digest
    assert main(["build", str(bundle), "--batch", "2", "--target-cc", "SM86", "--expect-digest", b.digest]) == 0
    records = [json.loads(p.read_text()) for p in (bundle / "engines").glob("*.json")]
    assert records and all(r["bundle_digest"] == b.digest for r in records)


@pytest.mark.parametrize("change", ["extra_file_listed", "unlisted_graph_line", "unsorted", "missing"])
def test_sha256sums_must_list_exactly_the_bundle(bundle, host, tmp_path, change):
    sums = (bundle / "SHA256SUMS").read_text().splitlines(keepends=True)
    if change == "extra_file_listed":
        (bundle / "zz.txt").write_text("x")
        write_sums(bundle, ["em.onnx", "manifest.json", "zz.txt"])
    elif change == "unlisted_graph_line":
        (bundle / "SHA256SUMS").write_text("".join(s for s in sums if "em.onnx" not in s))
    elif change == "unsorted":
        (bundle / "SHA256SUMS").write_text("".join(reversed(sums)))
    else:
        (bundle / "SHA256SUMS").unlink()
    with pytest.raises(BundleError, match="SHA256SUMS"):
        Bundle.load(bundle)
    r = _cpp(host, bundle, tmp_path)
    assert r.returncode == 2 and "SHA256SUMS" in r.stderr


def test_reseal_helper_is_what_export_writes(gmm_bundle, bundle):
    """The tests' reseal (used to build bad bundles) writes the same SHA256SUMS as export."""
    before = (bundle / "SHA256SUMS").read_bytes()
    reseal(bundle)
    assert (bundle / "SHA256SUMS").read_bytes() == before
