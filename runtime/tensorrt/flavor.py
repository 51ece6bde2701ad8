"""Which TensorRT is installed: full TensorRT (``tensorrt``) or TensorRT for RTX (``tensorrt_rtx``), behind one
small record. Every difference between the two that vpsde depends on lives here.

- TensorRT for RTX builds ahead of time for named compute capabilities (``--target-cc SM86,SM89``) on a
  machine with or without a GPU; it has no timing cache (its timing-cache calls are no-ops).
- Full TensorRT builds for the GPU it runs on (it needs one) and keeps a timing cache.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from vpsde.runtime.errors import BackendUnavailable

FLAVORS = ("auto", "tensorrt", "rtx")
_MODULES = {"tensorrt": ("tensorrt",), "rtx": ("tensorrt_rtx", "tensorrt_rtx_bindings")}
INSTALL_HINT = {"tensorrt": "pip install 'vpsde[tensorrt]' (NVIDIA's index; needs an NVIDIA GPU)",
                "rtx": "pip install 'vpsde[tensorrt-rtx]' (TensorRT for RTX: builds on CPU for SM75-SM121)"}


@dataclass(frozen=True)
class Flavor:
    """An imported TensorRT: ``name`` ("tensorrt" | "rtx"), ``version``, and the module ``trt``."""

    name: str
    version: str
    trt: ModuleType

    @property
    def targets_named_cc(self) -> bool:
        """Builds for named compute capabilities instead of the GPU it runs on."""
        return self.name == "rtx"

    @property
    def has_timing_cache(self) -> bool:
        return self.name == "tensorrt"

    def compute_capabilities(self) -> list[str]:
        """Targets this flavour can build for (RTX: "SM75", ...; full TensorRT: this machine's GPU only)."""
        if not self.targets_named_cc:
            from vpsde.runtime.tensorrt.cuda import gpu_info

            return [gpu_info().compute_capability]
        return [n for n in self.trt.ComputeCapability.__members__ if n.startswith("SM")]

    def set_targets(self, config, targets: list[str]) -> None:
        """Point a builder config at ``targets`` (RTX compute capabilities such as "SM86"). Full TensorRT
        builds for the GPU it runs on: ``targets`` must be exactly that GPU's (recorded in the engine key)."""
        if not self.targets_named_cc:
            here = self.compute_capabilities()
            if targets != here:
                raise BackendUnavailable(f"TensorRT {self.version} builds for the GPU it runs on ({here[0]}); "
                                         f"--target-cc {','.join(targets)} needs TensorRT for RTX "
                                         f"({INSTALL_HINT['rtx']})")
            return
        known = self.trt.ComputeCapability.__members__
        bad = [t for t in targets if t not in known or not t.startswith("SM")]
        if bad or not targets:
            raise BackendUnavailable(f"TensorRT for RTX {self.version} targets {', '.join(self.compute_capabilities())}; "
                                     f"got {', '.join(bad) or 'none'} (Hopper, SM90, is not among them)")
        config.num_compute_capabilities = len(targets)
        for i, target in enumerate(targets):
            config.set_compute_capability(known[target], i)


def _import(names: tuple[str, ...]) -> ModuleType | None:
    for name in names:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def load_flavor(which: str = "auto") -> Flavor:
    """Import the TensorRT asked for ("auto" prefers full TensorRT, then TensorRT for RTX)."""
    if which not in FLAVORS:
        raise BackendUnavailable(f"unknown TensorRT flavour {which!r}; expected one of {', '.join(FLAVORS)}")
    for name in (("tensorrt", "rtx") if which == "auto" else (which,)):
        module = _import(_MODULES[name])
        if module is not None:
            return Flavor(name, str(module.__version__), module)
    wanted = ("TensorRT or TensorRT for RTX" if which == "auto" else
              {"tensorrt": "TensorRT", "rtx": "TensorRT for RTX"}[which])
    hints = "; or ".join(INSTALL_HINT[n] for n in (("tensorrt", "rtx") if which == "auto" else (which,)))
    raise BackendUnavailable(f"{wanted} is not installed: {hints}")
