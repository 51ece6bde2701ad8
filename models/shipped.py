"""The model the project trains and ships: EMA weights as safetensors + a JSON config. Loading never runs
pickled code; every problem is reported with the file and what is wrong."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from vpsde.models.base import TimeLabelAdapter
from vpsde.runtime.atomic import atomic_path
from vpsde.models.unet import SmallUNet, UNetConfig

WEIGHTS_DIR = Path(__file__).parent / "weights"
REQUIRED_KEYS = ("name", "architecture", "time_label", "value_range", "weights", "weights_sha256")
ARCHITECTURES = {"SmallUNet": "unet", "ScoreSdeNet": "score_sde"}
"""Architecture -> the config key holding its hyperparameters (SmallUNet: this project's; ScoreSdeNet: score_sde's
DDPM++ / DDPM, as ``vpsde convert`` writes them)."""


class WeightsError(ValueError):
    """A weights file or config that does not fit (the message names the file)."""


def _atomic_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def state_bytes(net: nn.Module) -> bytes:
    """The network's state dict as safetensors bytes (float32, float64 buffers kept): what ``weights_sha256``
    hashes, the same for a model loaded from a checkpoint and for its converted files."""
    from safetensors.torch import save

    return save({k: v.detach().contiguous() if v.dtype == torch.float64 else v.detach().contiguous().float()
                 for k, v in net.state_dict().items()})


def save_weights(net: nn.Module, meta: dict, out: Path) -> None:
    """Write ``{name}.safetensors`` and ``{name}.json`` (config + sha256 of the weights) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    blob = state_bytes(net)
    name = meta["name"]
    meta = {**meta, "weights": f"{name}.safetensors", "weights_sha256": hashlib.sha256(blob).hexdigest()}
    _atomic_bytes(out / f"{name}.safetensors", blob)
    _atomic_bytes(out / f"{name}.json", (json.dumps(meta, indent=2) + "\n").encode())


def _check_config_types(meta: dict, path: Path) -> None:
    """Every field the loader uses has its JSON type; ``weights`` is a plain file name beside the config."""
    from vpsde.runtime.confine import is_plain_name

    types = {"architecture": str, "weights": str, "weights_sha256": str, "time_label": str, "unet": dict,
             "score_sde": dict}
    for key, tp in types.items():
        if key in meta and not isinstance(meta[key], tp):
            raise WeightsError(f"{path}: field {key!r}: expected {'an object' if tp is dict else 'a string'}, "
                               f"got {meta[key]!r:.60}")
    if not is_plain_name(meta["weights"]):
        raise WeightsError(f"{path}: field 'weights': expected a file name beside the config (no '/'), "
                           f"got {meta['weights']!r:.60}")
    if "name" in meta and not isinstance(meta["name"], str):
        raise WeightsError(f"{path}: field 'name': expected a string, got {meta['name']!r:.60}")
    vr = meta.get("value_range")
    if not (isinstance(vr, list) and len(vr) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                          for v in vr) and vr[0] < vr[1]):
        raise WeightsError(f"{path}: field 'value_range': expected [lo, hi] with lo < hi, got {vr!r:.60}")


def load_shipped(config_path: str | os.PathLike | None = None) -> TimeLabelAdapter:
    """Load a trained network from its JSON config (default: the shipped digits16) as a ScoreModel: a SmallUNet
    (config key ``unet``) or a score_sde DDPM++ / DDPM (``score_sde``, written by ``vpsde convert``)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = Path(config_path) if config_path else WEIGHTS_DIR / "digits16.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise WeightsError(f"{path}: model config not found") from None
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise WeightsError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise WeightsError(f"{path}: missing config key(s) {missing}; expected {list(REQUIRED_KEYS)}")
    _check_config_types(meta, path)
    arch = meta["architecture"]
    if arch not in ARCHITECTURES:
        raise WeightsError(f"{path}: field 'architecture': expected one of {sorted(ARCHITECTURES)}, got {arch!r}")
    config_key = ARCHITECTURES[arch]
    if config_key not in meta:
        raise WeightsError(f"{path}: architecture {arch!r} needs the config key {config_key!r}")
    try:
        if arch == "SmallUNet":
            config = UNetConfig.from_dict(meta[config_key])
            shape = (config.in_channels, config.resolution, config.resolution)
        else:
            from vpsde.models.score_sde import ScoreSdeConfig

            config = ScoreSdeConfig.from_dict(meta[config_key])
            shape = (config.num_channels, config.image_size, config.image_size)
    except (KeyError, TypeError, ValueError) as e:
        raise WeightsError(f"{path}: field {config_key!r}: {e}") from None
    weights = path.parent / meta["weights"]
    try:
        blob = weights.read_bytes()
    except FileNotFoundError:
        raise WeightsError(f"{weights}: weights file named by {path} is missing") from None
    sha = hashlib.sha256(blob).hexdigest()
    if sha != meta["weights_sha256"]:
        raise WeightsError(f"{weights}: sha256 {sha} does not match 'weights_sha256' in {path}")
    try:
        state = load(blob)
    except SafetensorError as e:
        raise WeightsError(f"{weights}: not a readable safetensors file ({e})") from None
    if arch == "SmallUNet":
        net = SmallUNet(config)
    else:
        from vpsde.models.score_sde import new_net

        net = new_net(config)
    expected = net.state_dict()
    problems = [f"missing {k}" for k in expected if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    problems += [f"{k}: shape {tuple(state[k].shape)}, architecture needs {tuple(v.shape)}"
                 for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems += [f"{k}: dtype {str(state[k].dtype).removeprefix('torch.')}, architecture needs "
                 f"{str(v.dtype).removeprefix('torch.')} (no silent casts)"
                 for k, v in expected.items() if k in state and state[k].dtype != v.dtype]
    if problems:
        raise WeightsError(f"{weights}: does not match the architecture in {path}: {'; '.join(problems[:5])}"
                           f"{' ...' if len(problems) > 5 else ''}")
    bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if bad:
        raise WeightsError(f"{weights}: non-finite values in {bad[:5]}")
    net.load_state_dict(state)
    label = meta["time_label"]
    if not label.endswith("t"):
        raise WeightsError(f"{path}: field 'time_label': expected '<scale>t' like '999t', got {label!r}")
    model = TimeLabelAdapter(net, shape, scale=float(label[:-1] or 1), name=meta["name"], weights_sha256=sha)
    model.value_range = tuple(meta["value_range"])
    return model.eval()
