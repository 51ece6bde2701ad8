"""Read score_sde_pytorch checkpoints (``checkpoint_*.pth``) into :class:`~vpsde.models.score_sde.ScoreSdeNet`.

Their ``save_checkpoint`` writes ``torch.save({"optimizer": ..., "model": ..., "ema": ..., "step": ...})``:
``model`` is the state dict of the ``DataParallel``-wrapped network (keys prefixed ``module.``, a float64
``module.sigmas`` buffer included) and ``ema`` is ``{"decay", "num_updates", "shadow_params"}``, the shadow
parameters as a list in parameter order (the state-dict order without buffers).

The file is a pickle, so this is the one place vpsde unpickles: ``torch.load(weights_only=True)`` (torch's
restricted unpickler: tensors, plain containers and numbers only), plus exactly the globals these files need
besides: numpy's scalar constructor (their optimizer's ``lr`` is a numpy float64), under numpy 2's module name
and numpy 1's, and ``numpy.dtype`` with its float64 class. Anything else is refused, naming the global.

What one load may allocate is bounded as well as what it may call: the scalar constructor and ``numpy.dtype`` are
checked stand-ins that take only real numeric dtypes of at most 8 bytes (a void dtype of 2 GB would otherwise be
allocated by a 1 kB file), and the file must be torch's zip format with at most :data:`MAX_CHECKPOINT_BYTES` of
content (the tensors' storages are the zip's records, so nothing larger can be asked for).
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from vpsde.models.score_sde import ScoreSdeConfig, ScoreSdeNet, new_net

try:
    _NP_SCALAR = np._core.multiarray.scalar  # numpy >= 2
except AttributeError:  # pragma: no cover - numpy 1.x
    _NP_SCALAR = np.core.multiarray.scalar

MAX_CHECKPOINT_BYTES = 16 << 30
"""Most bytes of content (uncompressed) a checkpoint may hold: a CIFAR-10 DDPM++ checkpoint (weights, EMA and
Adam's two moments) is about 1 GB."""

NUMPY_KINDS = "biuf"
"""numpy dtype kinds a checkpoint's numpy scalars may have (bool, int, unsigned, float: no void, object, string)."""


def _checked_dtype(*args, **kwargs) -> np.dtype:
    """``numpy.dtype`` for the unpickler: only real numeric dtypes of at most 8 bytes."""
    dtype = np.dtype(*args[:1])  # pickles pass (name, align, copy); only the name selects the dtype
    if dtype.kind not in NUMPY_KINDS or dtype.itemsize > 8:
        raise pickle.UnpicklingError(f"numpy dtype {str(dtype)[:40]!r}: only bool, integer and float dtypes of at "
                                     "most 8 bytes are accepted")
    return dtype


def _checked_scalar(dtype, data=None):
    """numpy's scalar constructor for the unpickler: a numeric dtype and exactly its bytes."""
    if not isinstance(dtype, np.dtype) or dtype.kind not in NUMPY_KINDS or dtype.itemsize > 8:
        raise pickle.UnpicklingError(f"numpy scalar of dtype {str(dtype)[:40]!r}: only bool, integer and float "
                                     "scalars of at most 8 bytes are accepted")
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise pickle.UnpicklingError(f"numpy scalar of dtype {dtype}: expected {dtype.itemsize} bytes of data")
    return _NP_SCALAR(dtype, data)


SAFE_GLOBALS = [(_checked_scalar, "numpy._core.multiarray.scalar"), (_checked_scalar, "numpy.core.multiarray.scalar"),
                (_checked_dtype, "numpy.dtype"), type(np.dtype(np.float64))]
"""What a score_sde checkpoint needs beyond torch's weights-only set, each under the name its pickle uses: numpy's
scalar constructor (numpy 2's and numpy 1's module names) and ``numpy.dtype``, both as checked stand-ins, and the
float64 dtype's class (its state is set when numpy rebuilds the scalar's dtype)."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the network (the message names the file and the key)."""


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The checkpoint dict, unpickled with ``weights_only=True`` and :data:`SAFE_GLOBALS` only."""
    path = Path(path)
    _check_container(path)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint not found") from None
    except pickle.UnpicklingError as e:
        bounded = re.search(r"numpy (dtype|scalar) [^\n]*", str(e))  # refused by a checked stand-in below
        if bounded:
            raise CheckpointError(f"{path}: refused: {bounded.group(0)}") from None
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


def _check_container(path: Path) -> None:
    """``path`` is a regular file in torch's zip format holding at most :data:`MAX_CHECKPOINT_BYTES` (the sum of its
    records' uncompressed sizes): nothing a load allocates for tensors can be larger."""
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a regular file; expected a torch checkpoint (.pth)")
    try:
        with zipfile.ZipFile(path) as archive:
            total = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError):
        raise CheckpointError(f"{path}: not a torch checkpoint in the zip format that torch.save writes (an empty, "
                              "truncated or legacy file?)") from None
    if total > MAX_CHECKPOINT_BYTES:
        raise CheckpointError(f"{path}: holds {total} bytes of content; at most {MAX_CHECKPOINT_BYTES} are accepted")


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
    if not isinstance(model, dict) or not all(isinstance(k, str) and _dense_real(v) for k, v in model.items()):
        raise CheckpointError(f"{path}: key 'model': expected the network's state dict (name -> dense real tensor)")
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


def _dense_real(value: object) -> bool:
    """A strided (not sparse) tensor of a real dtype: what a score_sde state holds (complex values would pass the
    finite check unchecked, sparse ones any shape check)."""
    return isinstance(value, torch.Tensor) and value.layout == torch.strided and not value.is_complex()


def _shadow_params(ckpt: dict, path) -> list[torch.Tensor]:
    ema = ckpt.get("ema")
    if not isinstance(ema, dict) or "shadow_params" not in ema:
        raise CheckpointError(f"{path}: key 'ema': expected score_sde's EMA state (decay, num_updates, shadow_params);"
                              " use ema=false to load the raw weights")
    shadow = ema["shadow_params"]
    if not isinstance(shadow, (list, tuple)) or not all(_dense_real(v) for v in shadow):
        raise CheckpointError(f"{path}: 'ema.shadow_params': expected a list of dense real tensors")
    return list(shadow)


def load_score_sde(path: str | os.PathLike, config: ScoreSdeConfig, ema: bool = True) -> ScoreSdeNet:
    """A :class:`ScoreSdeNet` of ``config`` with the checkpoint's EMA weights (``ema``) or raw weights, in eval mode."""
    net = new_net(config)
    net.load_state_dict(network_state(read_checkpoint(path), net, path, ema))
    return net.eval()
