"""Shared fixtures: small models and exported bundles (exported once per test session)."""

from __future__ import annotations

import pytest
import torch

from vpsde.export import VPSDE, export_bundle, load_model
from vpsde.models.base import TimeLabelAdapter


def pytest_collection_modifyitems(session, config, items) -> None:
    """Files holding a test marked slow run first, each file's own order kept: with two workers taking a file
    at a time (make test), the long files then do not start last and leave one worker idle at the end."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: the order within a file is unchanged


def tiny_unet(seed: int = 0):
    """A small random-weight UNet (channels 8): fast enough for 1000-step loops in eager torch."""
    return load_model(f"unet-random:seed={seed},channels=8", VPSDE(std_formula="diffusers"))


def small_conv(seed: int = 0) -> TimeLabelAdapter:
    """``conv-random:seed=N``: a random-weight convolutional model whose Hutchinson likelihood graph exports in
    seconds (a UNet's takes minutes) and, unlike the mixture's graphs, is row-invariant on ONNX Runtime's CPU
    kernels: continuous batching's likelihood tests."""
    return load_model(f"conv-random:seed={seed}", VPSDE(std_formula="diffusers"))


@pytest.fixture(scope="session")
def digits():
    """The shipped digits model (VP-SDE with score_sde's std), for tests that export it; read-only."""
    return load_model("digits", VPSDE())


@pytest.fixture(scope="session")
def unet_bundle(tmp_path_factory):
    return export_bundle(tiny_unet(), tmp_path_factory.mktemp("bundles") / "unet-em", steps=1000, grid="diffusers",
                         value_range=(-1, 1), log=lambda _: None)


@pytest.fixture(scope="session")
def gmm_bundle(tmp_path_factory):
    model = load_model("gmm", VPSDE(std_formula="diffusers"))
    return export_bundle(model, tmp_path_factory.mktemp("bundles") / "gmm-em", steps=1000, grid="diffusers",
                         log=lambda _: None)


@pytest.fixture(scope="session")
def diffusers_unet_dir(tmp_path_factory):
    """A tiny random diffusers UNet2DModel (with attention blocks), saved with save_pretrained: no hub access."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=8, attention_head_dim=8)
    path = tmp_path_factory.mktemp("diffusers") / "unet"
    unet.save_pretrained(path)
    return path


def em_step_errors(runner, bundle, model, steps, rng) -> list[float]:
    """An EM graph runner's x_mean vs the eager float32 step at schedule ``steps`` (8 fresh random samples each).
    fp32 bundles: max abs error. Half-precision bundles: the error on eps, i.e. divided by beta |dt| / std, the
    factor that carries eps into x_mean."""
    import numpy as np

    from vpsde.export.steps import EulerMaruyamaStep

    m, sde = bundle.manifest, VPSDE()
    step = EulerMaruyamaStep(model, sde)
    errors = []
    for i in steps:
        t = m.schedule["t"][i]
        x = torch.randn((8, *m.model.sample_shape), generator=rng)
        feed = {"x": x.numpy(), "t": np.full(8, t, np.float32), "noise": torch.randn(x.shape, generator=rng).numpy(),
                **{k: np.full(8, m.schedule[k][i], np.float32) for k in ("dt", "sqrt_neg_dt")}}
        got = runner.infer(feed)
        with torch.no_grad():
            ref = step(*(torch.from_numpy(feed[k]) for k in step.input_names))[1].numpy()
        assert np.isfinite(got["x_mean"]).all(), f"step {i}: NaN/Inf"
        err = float(np.abs(got["x_mean"] - ref).max())
        if m.model.precision != "fp32":
            err /= float(sde.beta(torch.tensor(t)) * -m.schedule["dt"][i] / sde.std(torch.tensor(t)))
        errors.append(err)
    return errors


def rel_l2(got, want) -> float:
    """Relative L2 error ||got - want|| / ||want||; asserts got is finite first (NaN never passes)."""
    import numpy as np

    assert np.isfinite(got).all(), "NaN/Inf in the result"
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.fixture
def rng() -> torch.Generator:
    """A fresh, seeded generator per test (fresh random inputs, reproducible failures)."""
    return torch.Generator().manual_seed(1234)


def reseal(root) -> None:
    """Rewrite ``root/SHA256SUMS`` after a test edited the bundle, as a producer of that (bad) bundle would: the
    error under test is then the one the edit causes, not the digest check that guards against edits."""
    import json
    from pathlib import Path

    from vpsde.runtime.bundle import write_sums

    root = Path(root)
    try:
        graphs = json.loads((root / "manifest.json").read_text())["graphs"]
        files = {g["file"] for g in graphs.values() if isinstance(g.get("file"), str)}
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        files = set()
    files = {f for f in files if "/" not in f and (root / f).is_file()}
    write_sums(root, ["manifest.json", *sorted(files)])


@pytest.fixture(scope="session")
def host():
    """The C++ host (hosts/cpp), built once: the directory holding vpsde-sample and vpsde-noise. Skips only when
    there is no C++ compiler or cmake; a failing build fails the test."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    missing = [tool for tool in ("cmake", "g++") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"no {' or '.join(missing)} on this machine: the C++ host cannot be built")
    root = Path(__file__).parent.parent
    r = subprocess.run(["bash", "hosts/cpp/build.sh"], cwd=root, capture_output=True, text=True, timeout=900,
                       env={"PYTHON": sys.executable, "PATH": "/usr/local/bin:/usr/bin:/bin", "JOBS": "2"})
    assert r.returncode == 0, f"C++ host build failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return root / "build" / "cpp"


def run_host(exe, *args, timeout: float = 600):
    """Run a C++ host tool; the completed process (text output)."""
    import subprocess

    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=timeout)


def copy_bundle(bundle, dst):
    """A private copy of a bundle (engines left out) at ``dst``; returns its path."""
    import shutil
    from pathlib import Path

    shutil.copytree(bundle.root, dst, ignore=shutil.ignore_patterns("engines"))
    return Path(dst)


def edit_manifest(root, edit, seal: bool = True):
    """Apply ``edit`` to the parsed manifest of bundle ``root`` and write it back; ``seal`` rewrites SHA256SUMS
    too, as the producer of such a bundle would (False: an edit after export, which the digest must catch)."""
    import json
    from pathlib import Path

    path = Path(root) / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    if seal:
        reseal(root)
