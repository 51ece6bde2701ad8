"""The GPU check's preparation cannot rot: bench/gpu_pack.py packs a wheel set into parts (here this Python's CPU
onnxruntime stands in for onnxruntime-gpu), bench/gpu_check.sh --dry-run reassembles them, checks every sha256,
unpacks into a private site, imports onnxruntime from there and runs vpsde doctor, as the device would; a part
copied wrong is refused. The device steps themselves run only where a GPU is lent (docs/gpu.md)."""

import json
import os
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


def test_a_part_copied_wrong_is_refused(packed, tmp_path):
    import shutil

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
    assert r.stderr.strip() == "--from: expected tests, export, parity, bench or gpu_loop, got 'parityy'"
    assert not any(tmp_path.iterdir())  # refused before anything was unpacked or written
