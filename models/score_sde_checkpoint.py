"""Read score_sde_pytorch checkpoints (``checkpoint_*.pth``) into :class:`~vpsde.models.score_sde.ScoreSdeNet`.

Their ``save_checkpoint`` writes ``torch.save({"optimizer": ..., "model": ..., "ema": ..., "step": ...})``:
``model`` is the state dict of the ``DataParallel``-wrapped network (keys prefixed ``module.``, a float64
``module.sigmas`` buffer included) and ``ema`` is ``{"decay", "num_updates", "shadow_params"}``, the shadow
parameters as a list in parameter order (the state-dict order without buffers).

The file is a pickle, so this is the one place vpsde unpickles: ``torch.load(weights_only=True)`` (torch's
restricted unpickler: tensors, plain containers and numbers only), plus exactly the globals these files need
besides: numpy's scalar constructor (their optimizer's ``lr`` is a numpy float64), under numpy 2's module name
and numpy 1's, and ``numpy.dtype`` with its float64 class. Anything else is refused, naming the global.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from vpsde.models.score_sde import ScoreSdeConfig, ScoreSdeNet

try:
    _NP_SCALAR = np._core.multiarray.scalar  # numpy >= 2
except AttributeError:  # pragma: no cover - numpy 1.x
    _NP_SCALAR = np.core.multiarray.scalar

SAFE_GLOBALS = [_NP_SCALAR, (_NP_SCALAR, "numpy.core.multiarray.scalar"), np.dtype, type(np.dtype(np.float64))]
"""What a score_sde checkpoint needs beyond torch's weights-only set: numpy's scalar constructor under numpy 2's
and numpy 1's module names, ``numpy.dtype`` and the float64 dtype's class (numpy rebuilds the scalar's dtype
with them)."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the network (the message names the file and the key)."""


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The checkpoint dict, unpickled with ``weights_only=True`` and :data:`SAFE_GLOBALS` only."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint not found") from None
    except pickle.UnpicklingError as e:
        found = _unsafe_globals(path) or re.findall(r"GLOBAL ([\w.]+)", str(e))
        what = f"it needs the global(s) {', '.join(repr(g) for g in found[:4])}, which are" if found else \
            "it holds an object that is"
        raise CheckpointError(f"{path}: refused: {what} not tensors, plain containers, numbers or numpy scalars; "
                              "vpsde opens checkpoints with torch.load(weights_only=True) and never runs pickled "
                              "code") from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({str(e).splitlines()[0][:200]})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected score_sde's checkpoint dict (optimizer, model, ema, step), got "
                              f"{type(obj).__name__}")
    return obj


def _unsafe_globals(path: Path) -> list[str]:
    """The globals a checkpoint's pickle names beyond torch's weights-only set (read from its opcodes, nothing
    executed), minus the ones allowed here; [] if it cannot be read that way (e.g. a legacy, non-zip file)."""
    allowed = {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}" for g in SAFE_GLOBALS}
    try:
        return [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if g not in allowed]
    except Exception:  # noqa: BLE001 - only used to word the error
        return []


def network_state(ckpt: dict, net: ScoreSdeNet, path: str | os.PathLike, ema: bool = True) -> dict[str, torch.Tensor]:
    """The state dict for ``net`` from a checkpoint dict: the ``model`` state (``module.`` prefix removed), with
    every parameter replaced by the EMA shadow when ``ema``. Every key must be used and none missing; shapes
    must match; values must be finite."""
    model = ckpt.get("model")
    if not isinstance(model, dict) or not all(isinstance(v, torch.Tensor) for v in model.values()):
        raise CheckpointError(f"{path}: key 'model': expected the network's state dict (name -> tensor)")
    state = {k.removeprefix("module."): v for k, v in model.items()}
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = ([f"missing {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}"] if missing else []) + \
                ([f"unexpected {', '.join(unexpected[:4])}{' ...' if len(unexpected) > 4 else ''}"] if unexpected else [])
        raise CheckpointError(f"{path}: 'model' does not fit the {net.config.family} network of this config: "
                              f"{'; '.join(parts)} (wrong config? pass config=NAME or a JSON config)")
    for k, v in expected.items():
        if state[k].shape != v.shape:
            raise CheckpointError(f"{path}: 'model' key {k!r}: shape {list(state[k].shape)}, the config's network "
                                  f"needs {list(v.shape)}")
    if ema:
        shadow = _shadow_params(ckpt, path)
        names = [n for n, _ in net.named_parameters()]
        if len(shadow) != len(names):
            raise CheckpointError(f"{path}: 'ema.shadow_params' has {len(shadow)} tensors, the network has {len(names)} "
                                  "parameters")
        for name, value in zip(names, shadow):
            if value.shape != expected[name].shape:
                raise CheckpointError(f"{path}: 'ema.shadow_params' entry for {name!r}: shape {list(value.shape)}, "
                                      f"expected {list(expected[name].shape)} (out of parameter order?)")
            state[name] = value
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{path}: non-finite values in {bad[:4]}")
    return {k: state[k].to(expected[k].dtype) for k in expected}


def _shadow_params(ckpt: dict, path) -> list[torch.Tensor]:
    ema = ckpt.get("ema")
    if not isinstance(ema, dict) or "shadow_params" not in ema:
        raise CheckpointError(f"{path}: key 'ema': expected score_sde's EMA state (decay, num_updates, shadow_params);"
                              " use ema=false to load the raw weights")
    shadow = ema["shadow_params"]
    if not isinstance(shadow, (list, tuple)) or not all(isinstance(v, torch.Tensor) for v in shadow):
        raise CheckpointError(f"{path}: 'ema.shadow_params': expected a list of tensors")
    return list(shadow)


def load_score_sde(path: str | os.PathLike, config: ScoreSdeConfig, ema: bool = True) -> ScoreSdeNet:
    """A :class:`ScoreSdeNet` of ``config`` with the checkpoint's EMA weights (``ema``) or raw weights, in eval mode."""
    net = ScoreSdeNet(config)
    net.load_state_dict(network_state(read_checkpoint(path), net, path, ema))
    return net.eval()
