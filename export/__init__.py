"""Torch side: VP-SDE math, step modules, ONNX export of bundles. Imports models and runtime schema types."""

from vpsde.export.bundle import export_bundle
from vpsde.export.grids import time_grid
from vpsde.models.sde import VPSDE
from vpsde.export.sources import load_model
from vpsde.export.samplers import SAMPLERS, build_sampler, steps_for_nfe
from vpsde.export.steps import EulerMaruyamaStep

__all__ = ["VPSDE", "EulerMaruyamaStep", "SAMPLERS", "build_sampler", "export_bundle", "load_model", "steps_for_nfe",
           "time_grid"]
