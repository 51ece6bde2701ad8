"""Errors the runtime raises on purpose; the CLI prints their message without a traceback."""


class VpsdeError(Exception):
    """Base class: a message meant for the user (what is wrong, where, what was expected)."""


class BundleError(VpsdeError):
    """The bundle on disk is not what the manifest promises (missing file, bad field, sha256 mismatch...)."""


class InputError(VpsdeError):
    """An array handed to a runner has the wrong name, dtype or shape."""


class NonFiniteError(VpsdeError):
    """A graph produced NaN or Inf (raised by the sampler's NaN guard)."""


class BackendUnavailable(VpsdeError):
    """The requested backend or device is not installed or not present on this machine."""
