"""Resolve a model spec string (the CLI's ``--model``) into a :class:`ScoreModel`. No hub downloads.

    digits                                    the shipped model: DDPM++-style UNet trained on 16x16 digits
    weights:PATH.json                         a SmallUNet trained by vpsde.models.train_digits (its JSON config)
    diffusers:DIR                             a diffusers UNet2DModel save_pretrained directory or a pipeline root
                                              (its unet/; scheduler/ decides eps, v or x0 and is checked
                                              against the VP-SDE; label 999 t)
    gmm[:dim=2,components=3,seed=0,full=0]    analytic Gaussian-mixture score (exact, known ground truth);
                                              full=1: rotated full covariances, stds 0.1-2, |mu| <= 9
    unet-random[:seed=0,channels=16,...]      small DDPM++-style UNet with random weights, sample [1, 16, 16]
    conv-random[:seed=0,hidden=8]             two 3x3 convolutions with random weights, sample [1, 8, 8] (its
                                              likelihood graph exports in seconds: smoke checks)
    score_sde:PATH[,config=NAME|JSON][,ema=true]   a score_sde_pytorch checkpoint_*.pth (DDPM++ / DDPM; config:
                                              a preset, default cifar10_ddpmpp_continuous, or a JSON object;
                                              ema=false: the raw weights); opened with torch.load(weights_only)
    score_sde-random[:config=NAME|JSON,seed=0]  that network with random weights (benchmarks)
    py:package.module:factory                 any callable returning a ScoreModel, or an nn.Module
    py:path/to/file.py:factory                net(x, label) (then --sample-shape is required; label = S t with S
                                              from --time-label-scale, default 999); docs/python-api.md
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
from typing import Any

import torch
from torch import nn

from vpsde.models.sde import VPSDE
from vpsde.models import GaussianMixture, GaussianMixtureScore, ScoreModel, SmallUNet, TimeLabelAdapter, UNetConfig

SPEC_HELP = __doc__


class ModelSpecError(ValueError):
    """A --model string that cannot be resolved (message says what was expected)."""


SELF_CONTAINED_GMM_LIMIT = 64
"""Largest ``dim`` and ``components`` of a self-contained ``gmm`` spec (a rotated mixture holds components x dim^2
floats)."""


GMM_ELEMENTS = 1 << 26
"""Largest components x dim^2 of a ``gmm`` spec: the mixture holds a rotation per component (512 MiB in float64)."""


def self_contained(spec: str) -> bool:
    """Whether ``spec`` names a model vpsde builds from its own code and data alone, importing nothing, reading no
    file and allocating a bounded amount: ``digits``, or ``gmm`` with dim and components up to
    :data:`SELF_CONTAINED_GMM_LIMIT`. Only such a spec may be taken from a bundle (untrusted) without the user
    naming the model."""
    kind, _, rest = spec.partition(":")
    if kind == "digits":
        return rest == ""
    if kind != "gmm":
        return False
    try:
        o = _options(rest, {"dim": int, "components": int, "seed": int, "full": int})
    except ModelSpecError:
        return False
    return 1 <= o.get("dim", 2) <= SELF_CONTAINED_GMM_LIMIT and 1 <= o.get("components", 3) <= SELF_CONTAINED_GMM_LIMIT


def _split_options(text: str) -> list[str]:
    """'a=1,config={"ch_mult":[1,2]},b=2' -> the non-empty items between the commas outside JSON braces and
    brackets."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch in "{[") - (ch in "}]")
        if ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ModelSpecError(f"model options {text[:40]!r}: unbalanced braces in a JSON value")
    return [item for item in [*items, text[start:]] if item]


def _options(text: str, allowed: dict[str, type]) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    for item in _split_options(text):
        key, sep, value = item.partition("=")
        if not sep or key not in allowed:
            raise ModelSpecError(f"model option {item!r}: expected key=value with key in {sorted(allowed)}")
        try:
            opts[key] = allowed[key](value)
        except ValueError:
            raise ModelSpecError(f"model option {key}={value!r}: expected {allowed[key].__name__}") from None
    return opts


def parse_score_sde_spec(rest: str) -> tuple[str, str, bool]:
    """'PATH[,config=NAME|JSON][,ema=true|false]' -> (path, config text, ema). A JSON config may hold commas."""
    path, _, tail = rest.partition(",")
    config, ema = "cifar10_ddpmpp_continuous", True
    for item in _split_options(tail):
        key, eq, value = item.partition("=")
        if not eq or key not in ("config", "ema"):
            raise ModelSpecError(f"score_sde option {item[:40]!r}: expected config=NAME|JSON or ema=true|false")
        if key == "config":
            config = value
        elif value.lower() in ("true", "false"):
            ema = value.lower() == "true"
        else:
            raise ModelSpecError(f"score_sde option ema={value!r}: expected true or false")
    if not path:
        raise ModelSpecError("score_sde:PATH: the checkpoint path is missing")
    return path, config, ema


def _wrap_score_sde(net, spec: str) -> ScoreModel:
    """A score_sde network as a ScoreModel: label 999 t, output eps, value range [-1, 1] or [0, 1] (centered)."""
    from vpsde.models.shipped import state_bytes

    c = net.config
    model = TimeLabelAdapter(net, (c.num_channels, c.image_size, c.image_size), scale=999.0, name=spec[:200],
                             weights_sha256=hashlib.sha256(state_bytes(net)).hexdigest())
    model.value_range = (-1.0, 1.0) if c.centered else (0.0, 1.0)
    return model


def _score_sde_model(spec: str, rest: str) -> ScoreModel:
    from vpsde.models.score_sde import config_from_spec
    from vpsde.models.score_sde_checkpoint import CheckpointError, load_score_sde

    path, config_text, ema = parse_score_sde_spec(rest)
    try:
        net = load_score_sde(path, config_from_spec(config_text), ema)
    except (CheckpointError, ValueError) as e:
        raise ModelSpecError(f"--model {spec[:80]!r}: {e}") from None
    return _wrap_score_sde(net, spec)


def _py_factory(spec: str, module_name: str, attr: str):
    """The factory a py: spec names: from a file (``path/to/file.py``), or a module importable from sys.path or
    the working directory (as ``python -m`` would find it). The user's code: --model is never read from a bundle."""
    import os
    import sys
    from pathlib import Path

    try:
        if module_name.endswith(".py") or os.sep in module_name:
            path = Path(module_name)
            if not path.is_file():
                raise ModelSpecError(f"--model {spec!r}: {path} is not a file")
            loader = importlib.util.spec_from_file_location(f"vpsde_user_model_{path.stem}", path)
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as e:
                if e.name != module_name.split(".")[0] or os.getcwd() in sys.path:
                    raise
                sys.path.insert(0, os.getcwd())
                module = importlib.import_module(module_name)
        return getattr(module, attr)
    except (ImportError, AttributeError, OSError) as e:
        raise ModelSpecError(f"--model {spec!r}: cannot import {module_name}:{attr} ({e})") from None


def load_model(spec: str, sde: VPSDE, sample_shape: tuple[int, ...] | None = None,
               label_scale: float = 999.0) -> ScoreModel:
    """Build the model a spec names, in eval mode. Raises ModelSpecError (one line) for anything wrong with it."""
    try:
        model = _build(spec, sde, sample_shape, label_scale)
    except ModelSpecError:
        raise
    except ValueError as e:  # an option the network refuses (channels not divisible into groups, ...)
        raise ModelSpecError(f"--model {spec!r}: {str(e).strip().splitlines()[0]}") from None
    model.spec = spec  # export records it as model.source (shown by vpsde inspect; never run from a bundle unless
    # self_contained)
    if model.weights_sha256 is None and model.state_dict():
        from vpsde.models.shipped import state_bytes

        model.weights_sha256 = hashlib.sha256(state_bytes(model)).hexdigest()  # py:, diffusers:, *-random, gmm
    return model.eval()


def _build(spec: str, sde: VPSDE, sample_shape: tuple[int, ...] | None, label_scale: float) -> ScoreModel:
    kind, _, rest = spec.partition(":")
    if kind in ("digits", "weights"):
        from vpsde.models.shipped import WeightsError, load_shipped

        try:
            model = load_shipped(rest if kind == "weights" else None)
        except WeightsError as e:
            raise ModelSpecError(str(e)) from None
    elif kind == "diffusers":
        from vpsde.models.diffusers_unet import load_diffusers_unet

        try:
            model = load_diffusers_unet(rest, label_scale, sde)
        except (OSError, ValueError) as e:
            raise ModelSpecError(f"--model {spec!r}: {e}") from None
    elif kind == "gmm":
        o = _options(rest, {"dim": int, "components": int, "seed": int, "full": int})
        make = GaussianMixture.rotated if o.pop("full", 0) else GaussianMixture.default
        size = inspect.signature(make).parameters
        dim, components = o.get("dim", size["dim"].default), o.get("components", size["components"].default)
        if dim * dim * components > GMM_ELEMENTS:
            raise ModelSpecError(f"--model {spec!r}: components x dim^2 = {components * dim * dim} floats (the "
                                 f"mixture's rotations); at most {GMM_ELEMENTS}")
        try:
            mixture = make(**o)
        except ValueError as e:
            raise ModelSpecError(f"--model {spec!r}: {e}") from None
        model: ScoreModel = GaussianMixtureScore(mixture, sde, name=f"gmm:{rest}" if rest else "gmm")
    elif kind == "score_sde":
        model = _score_sde_model(spec, rest)
    elif kind == "score_sde-random":
        from vpsde.models.score_sde import config_from_spec, new_net

        o = _options(rest, {"config": str, "seed": int})
        torch.manual_seed(o.get("seed", 0))
        try:
            config = config_from_spec(o.get("config", "cifar10_ddpmpp_continuous"))
        except ValueError as e:
            raise ModelSpecError(f"--model {spec!r}: {e}") from None
        model = _wrap_score_sde(new_net(config), spec)
    elif kind == "unet-random":
        o = _options(rest, {"seed": int, "channels": int, "num_res_blocks": int})
        torch.manual_seed(o.pop("seed", 0))
        cfg = UNetConfig(channels=o.get("channels", 16), num_res_blocks=o.get("num_res_blocks", 1))
        model = TimeLabelAdapter(SmallUNet(cfg), (cfg.in_channels, cfg.resolution, cfg.resolution),
                                 scale=label_scale, name=spec)
    elif kind == "conv-random":
        from vpsde.models.small_conv import SmallConv

        o = _options(rest, {"seed": int, "hidden": int})
        if not 1 <= o.get("hidden", 8) <= 4096:
            raise ModelSpecError(f"--model {spec!r}: hidden: expected an integer in 1..4096, got {o['hidden']}")
        torch.manual_seed(o.get("seed", 0))
        model = TimeLabelAdapter(SmallConv(o.get("hidden", 8)), (1, 8, 8), name=spec)
    elif kind == "py":
        module_name, _, attr = rest.rpartition(":")
        if not module_name or not attr:
            raise ModelSpecError(f"--model {spec!r}: expected py:package.module:factory or py:path/to/file.py:factory")
        factory = _py_factory(spec, module_name, attr)
        net = factory()
        if isinstance(net, ScoreModel):
            model = net
        elif isinstance(net, nn.Module):
            if not sample_shape:
                raise ModelSpecError(f"--model {spec!r} returned a plain nn.Module: give --sample-shape C,H,W")
            model = TimeLabelAdapter(net, sample_shape, scale=label_scale, name=spec)
        else:
            raise ModelSpecError(f"--model {spec!r}: factory returned {type(net).__name__}, expected an nn.Module")
    else:
        raise ModelSpecError(f"unknown model {spec!r}; expected digits, weights:PATH.json, diffusers:DIR, gmm[:...], "
                             "unet-random[:...], conv-random[:...], score_sde:PATH[,...], score_sde-random[:...] or "
                             "py:package.module:factory (vpsde export --help lists them)")
    return model
