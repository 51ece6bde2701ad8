"""A bundle never chooses code to run or files to read (docs/DESIGN.md, trust boundary): `vpsde parity --against
eager` rebuilds the eager model from the manifest's ``model.source`` only when it is self-contained (the shipped
digits model, a small analytic mixture); anything else needs the user's --model, whose weights must match the
bundle's recorded digest. Each case re-seals the bundle, as its producer would, and runs the CLI in a child
process with a private TMPDIR, so that code which exits or writes would show."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import copy_bundle, edit_manifest
from vpsde.export import VPSDE, export_bundle, load_model

pytest.importorskip("polygraphy", reason="vpsde[parity] (polygraphy) not installed")

GMM = "gmm:dim=3,components=2,seed=4"


@pytest.fixture(scope="module")
def gmm_dpm(tmp_path_factory):
    return export_bundle(load_model(GMM, VPSDE()), tmp_path_factory.mktemp("code") / "gmm", sampler="dpmpp-2m",
                         steps=6, log=lambda _: None)


def _parity(root, tmp_path, *extra):
    scratch = tmp_path / "tmpdir"
    scratch.mkdir(exist_ok=True)
    env = {**os.environ, "TMPDIR": str(scratch)}
    run = subprocess.run([sys.executable, "-m", "vpsde.cli.main", "parity", str(root), "--against", "eager",
                          "--num", "2", *extra], capture_output=True, text=True, timeout=300, env=env)
    return run, sorted(p.name for p in scratch.iterdir())


@pytest.mark.parametrize("source", ["py:sys:exit", "py:tempfile:mkdtemp", "py:os:getcwd",
                                    "weights:/etc/passwd", "diffusers:/", "score_sde:/etc/hostname",
                                    "unet-random:channels=1000000", "score_sde-random:config=cifar10_ddpmpp_continuous",
                                    "gmm:dim=100000,components=3", "gmm:dim=3,components=1000000", "digits:x"])
def test_a_bundle_cannot_choose_the_eager_model(gmm_dpm, tmp_path, source):
    root = copy_bundle(gmm_dpm, tmp_path / "b")
    edit_manifest(root, lambda d: d["model"].update(source=source))
    run, left = _parity(root, tmp_path)
    assert run.returncode == 2, (run.returncode, run.stdout[-500:], run.stderr[-1500:])
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "--model" in lines[0] and "manifest.json" in lines[0], run.stderr
    assert left == []  # nothing was created (py:tempfile:mkdtemp would have made a directory here)


def test_the_users_model_is_checked_against_the_recorded_weights(gmm_dpm, tmp_path):
    root = copy_bundle(gmm_dpm, tmp_path / "b")
    edit_manifest(root, lambda d: d["model"].update(source="py:sys:exit"))
    run, _ = _parity(root, tmp_path, "--model", GMM)  # the user names the model: it runs, and passes
    assert run.returncode == 0, run.stderr[-1500:]
    assert "ok" in run.stdout
    run, _ = _parity(root, tmp_path, "--model", "gmm:dim=3,components=2,seed=5")  # same shape, other weights
    assert run.returncode == 2 and "weights_sha256" in run.stderr, run.stderr[-1500:]


def test_every_model_spec_records_a_weights_digest():
    """py:, diffusers:, unet-random and gmm models recorded weights_sha256 null before 0.4.2: nothing for the
    eager check to hold the user's model to."""
    sde = VPSDE()
    digests = {spec: load_model(spec, sde).weights_sha256 for spec in
               ("digits", GMM, "gmm:dim=3,components=2,seed=5", "unet-random:seed=1,channels=8",
                "unet-random:seed=2,channels=8", "conv-random", "conv-random:seed=1,hidden=4")}
    assert all(isinstance(d, str) and len(d) == 64 for d in digests.values()), digests
    assert len(set(digests.values())) == len(digests)  # different weights, different digests
    assert load_model(GMM, sde).weights_sha256 == digests[GMM]  # and the same weights, the same digest


def test_inspect_shows_where_the_bundle_says_it_came_from(gmm_dpm, tmp_path, capsys):
    from vpsde.cli.main import main as cli

    root = copy_bundle(gmm_dpm, tmp_path / "b")
    edit_manifest(root, lambda d: d["model"].update(source="py:sys:exit"))
    assert cli(["inspect", str(root)]) == 0
    out = capsys.readouterr().out
    assert "source      py:sys:exit" in out and "never run from the bundle" in out
    assert f"weights     sha256 {gmm_dpm.manifest.model.weights_sha256}" in out
