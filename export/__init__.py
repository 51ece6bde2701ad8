"""Torch side: VP-SDE math, step modules, ONNX export of bundles. Imports models and runtime schema types."""

from vpsde.export.bundle import export_bundle
from vpsde.export.grids import time_grid
from vpsde.models.sde import VPSDE
from vpsde.export.sources import load_model
from vpsde.export.steps import EulerMaruyamaStep

__all__ = ["VPSDE", "EulerMaruyamaStep", "export_bundle", "load_model", "time_grid"]
