"""Moved to :mod:`vpsde.verify.parity` (0.5.0); this name stays for 0.4.x code until 0.6."""

import warnings

from vpsde.verify.parity import *  # noqa: F401,F403
from vpsde.verify.parity import BackendSide, ParityReport, Side, compare  # noqa: F401
from vpsde.verify.tolerances import TOLERANCES, Tolerance, bar_for, lower_precision, tolerance_help  # noqa: F401

warnings.warn("vpsde.runtime.parity moved to vpsde.verify.parity (tolerances: vpsde.verify.tolerances)",
              DeprecationWarning, stacklevel=2)
