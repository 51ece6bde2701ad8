"""The torch-free runtime: load a bundle, run its step graphs, generate the noise on the host."""

from importlib.metadata import PackageNotFoundError, version

from vpsde.runtime.bundle import Bundle
from vpsde.runtime.errors import BackendUnavailable, BundleError, InputError, NonFiniteError, VpsdeError
from vpsde.runtime.manifest import SCHEMA_VERSION, Manifest
from vpsde.runtime.noise import PhiloxNoise, philox_normal
from vpsde.runtime.sampler import Sampler

try:
    __version__ = version("vpsde")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0+unknown"

__all__ = ["Bundle", "Manifest", "Sampler", "SCHEMA_VERSION", "PhiloxNoise", "philox_normal", "VpsdeError",
           "BundleError", "InputError", "NonFiniteError", "BackendUnavailable", "__version__"]
