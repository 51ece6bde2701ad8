"""Errors the runtime raises on purpose; the CLI prints their message without a traceback."""


class VpsdeError(Exception):
    """Base class: a message meant for the user (what is wrong, where, what was expected)."""


class BundleError(VpsdeError):
    """The bundle on disk is not what the manifest promises (missing file, bad field, sha256 mismatch...)."""


class InputError(VpsdeError):
    """An array handed to a runner has the wrong name, dtype or shape."""


class NonFiniteError(VpsdeError):
    """A graph produced NaN or Inf (raised by the sampler's NaN guard)."""


class ExportError(VpsdeError):
    """torch could not trace or export the model inside a sampler step (``vpsde export``)."""


class BackendUnavailable(VpsdeError):
    """The requested backend or device is not installed or not present on this machine."""


def first_line(e: BaseException, default: str | None = None) -> str:
    """The first line of ``e``'s message (libraries raise long multi-line texts), else ``default`` or its type's
    name: what a one-line error quotes of a cause."""
    text = str(e).strip()
    return text.splitlines()[0] if text else (type(e).__name__ if default is None else default)
