"""The GPU check's preparation cannot rot: bench/gpu_pack.py packs a wheel set into parts (here this Python's CPU
onnxruntime stands in for onnxruntime-gpu), bench/gpu_check.sh --dry-run reassembles them, checks every sha256,
unpacks into a private site, maps the repository as the vpsde package, imports onnxruntime from there and runs
vpsde doctor, as the device would; a part copied wrong is refused; --rehearse runs every step of the check on the
CPU. The device steps themselves run on CUDA only where a GPU is lent (docs/gpu.md)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpucheck") / "parts"
    r = subprocess.run([sys.executable, "bench/gpu_pack.py", "--standin", "cpu", "--part-mib", "4", "--xz-preset", "0",
                        "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    if r.returncode != 0 and "pip download" in r.stderr + r.stdout and "Could not" in r.stderr:
        pytest.skip(f"no package index reachable for the stand-in wheel: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def test_parts_reassemble_unpack_and_import_from_the_private_site(packed, tmp_path):
    manifest = json.loads((packed / "manifest.json").read_text())
    assert len(manifest["parts"]) >= 2 and all((packed / p["name"] / "chunk").stat().st_size <= 4 << 20
                                               for p in manifest["parts"])
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    r = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run", str(packed)], cwd=ROOT, capture_output=True,
                       text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert f"{packed}/site/onnxruntime/__init__.py" in log  # imported from the unpacked site, not the venv's
    assert "dry run: unpacked, imported, doctor ran" in log
    again = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run", str(packed)], cwd=ROOT, capture_output=True,
                           text=True, timeout=600, env={**env, "OUT": str(tmp_path / "again")})
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "already holds these" in (tmp_path / "again" / "gpu_check.log").read_text()  # a rerun skips the unpacking


def test_a_part_copied_wrong_is_refused(packed, tmp_path):
    parts = tmp_path / "parts"
    shutil.copytree(packed, parts, ignore=shutil.ignore_patterns("site", "ns", "out"))
    chunk = parts / "part01" / "chunk"
    chunk.write_bytes(chunk.read_bytes()[:-1] + b"\0")
    r = subprocess.run([sys.executable, "bench/gpu_unpack.py", "--parts", str(parts), "--manifest",
                        str(parts / "manifest.json"), "--site", str(tmp_path / "site")], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode != 0 and "part01/chunk: sha256 differs" in r.stderr
    assert not (tmp_path / "site").exists()


def test_a_rerun_from_an_unknown_step_is_one_line(tmp_path):
    r = subprocess.run(["bash", "bench/gpu_check.sh", "--from", "parityy", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip() == "--from: expected tests, export, parity, bench, gpu_loop or likelihood, got 'parityy'"
    assert not any(tmp_path.iterdir())  # refused before anything was unpacked or written


@pytest.mark.slow
def test_every_step_rehearsed_on_the_cpu_writes_the_figures(packed, tmp_path):
    """The whole check with --device cpu, fewer steps and batches: the exports (a 16x16 DDPM++ stands in for the
    CIFAR-scale one, whose export test_score_sde covers), parity against eager, the benches, the loop benchmark and the
    carried likelihood bundle's bench (here the mixture's, which exports in seconds) each write their file, and the
    files are at most the 8 the device tool returns."""
    from vpsde.export import VPSDE, export_bundle, load_model

    parts = tmp_path / "parts"
    shutil.copytree(packed, parts, ignore=shutil.ignore_patterns("site", "ns", "out", "work"))
    lik = export_bundle(load_model("gmm", VPSDE()), tmp_path / "lik", sampler="likelihood", steps=4,
                        log=lambda _: None)
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "LIKELIHOOD_BUNDLE": str(lik.root)}
    r = subprocess.run(["bash", "bench/gpu_check.sh", "--rehearse", str(parts)], cwd=ROOT, capture_output=True,
                       text=True, timeout=900, env=env)
    log = (out / "gpu_check.log").read_text()
    assert r.returncode == 0 and "== done" in log and "Traceback" not in log, log[-3000:]
    assert sorted(p.name for p in out.iterdir()) == sorted([
        "gpu_check.log", "parity-em.json", "parity-dpm.json", "parity-cifar.json", "bench-em.json", "bench-dpm.json",
        "bench-lik.json", "gpu_loop.json"])
    for bundle in ("em", "dpm", "cifar"):
        comparisons = json.loads((out / f"parity-{bundle}.json").read_text())["comparisons"]
        assert comparisons and all(c["passed"] for c in comparisons), bundle
    for bundle in ("em", "dpm", "lik"):
        rows = json.loads((out / f"bench-{bundle}.json").read_text())["rows"]
        assert sorted(row["batch"] for row in rows) == [1, 4] and all(row["ms_per_step"] > 0 for row in rows)
    loops = json.loads((out / "gpu_loop.json").read_text())["loops"]
    assert sorted(loops) == ["diffusers-eager", "torch-cudagraphs", "vpsde-ort-cpu"]
    for kind, loop in loops.items():
        assert "error" not in loop and sorted(loop["batches"]) == ["1", "4"], (kind, loop.get("error"))
