"""Shared fixtures: small models and exported bundles (exported once per test session)."""

from __future__ import annotations

import pytest
import torch

from vpsde.export import VPSDE, export_bundle, load_model


def tiny_unet(seed: int = 0):
    """A small random-weight UNet (channels 8): fast enough for 1000-step loops in eager torch."""
    return load_model(f"unet-random:seed={seed},channels=8", VPSDE(std_formula="diffusers"))


@pytest.fixture(scope="session")
def unet_bundle(tmp_path_factory):
    return export_bundle(tiny_unet(), tmp_path_factory.mktemp("bundles") / "unet-em", steps=1000, grid="diffusers",
                         value_range=(-1, 1), log=lambda _: None)


@pytest.fixture(scope="session")
def gmm_bundle(tmp_path_factory):
    model = load_model("gmm", VPSDE(std_formula="diffusers"))
    return export_bundle(model, tmp_path_factory.mktemp("bundles") / "gmm-em", steps=1000, grid="diffusers",
                         log=lambda _: None)


@pytest.fixture
def rng() -> torch.Generator:
    """A fresh, seeded generator per test (fresh random inputs, reproducible failures)."""
    return torch.Generator().manual_seed(1234)
