"""The vpsde command: export -> inspect -> sample end to end, --help, and errors without tracebacks."""

import subprocess
import sys

import numpy as np
import pytest

from vpsde.cli.main import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "vpsde.cli.main", *args], capture_output=True, text=True, timeout=600)


def test_export_inspect_sample_end_to_end(tmp_path, capsys):
    b = tmp_path / "gmm"
    assert main(["export", "--model", "gmm:dim=3,components=2", "--steps", "20", "--grid", "uniform", "--out", str(b)]) == 0
    assert main(["inspect", str(b)]) == 0
    assert "euler-maruyama  20 steps  uniform grid" in capsys.readouterr().out
    assert main(["sample", str(b), "--num", "5", "--seed", "3", "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    with np.load(tmp_path / "o" / "samples.npz") as f:
        assert f["samples"].shape == (5, 3) and np.isfinite(f["samples"]).all() and int(f["seed"]) == 3


def test_sample_writes_png_grid_for_images(unet_bundle, tmp_path):
    from PIL import Image

    r = run_cli("sample", str(unet_bundle.root), "--num", "4", "--out", str(tmp_path), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "grid.png" in r.stdout
    img = Image.open(tmp_path / "grid.png")
    assert img.size == (2 * 65 + 1, 2 * 65 + 1)  # 2x2 tiles of 16*4 px, 1 px padding


@pytest.mark.parametrize("args, message", [
    (["sample", "/no/such/bundle"], "not a directory"),
    (["sample", ".", "--num", "0"], "expected an integer >= 1"),
    (["export", "--model", "nope", "--out", "/tmp/x"], "unknown model 'nope'"),
    (["export", "--model", "gmm:dims=3", "--out", "/tmp/x"], "model option 'dims=3'"),
    (["sample", ".", "--seed", "-1"], "expected 0 <= seed < 2^64"),
])
def test_errors_are_messages_not_tracebacks(args, message):
    r = run_cli(*args)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr


def test_help_shows_defaults():
    r = run_cli("sample", "--help")
    assert r.returncode == 0 and "(default: 64)" in r.stdout
