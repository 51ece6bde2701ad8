"""The eager torch side of ``vpsde parity``: a bundle's step modules rebuilt from its manifest and run in torch.

The manifest records what the graphs were exported from: the model spec (``model.source``), its weights' hash,
the SDE, and the sampler with its options (``sampler.params``). :class:`EagerSide` rebuilds the same step
modules with :func:`build_sampler` and runs them on the runtime's host arrays, in float32 (what the graphs
compute) or float64 (a reference one rounding step away from exact arithmetic).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from vpsde.export.samplers import SAMPLERS, build_sampler, tuned_edges_in
from vpsde.export.sources import ModelSpecError, load_model, self_contained
from vpsde.export.tuning import TUNED
from vpsde.models.base import ScoreModel
from vpsde.models.sde import VPSDE
from vpsde.runtime.errors import InputError, first_line

GAIN_SHIFT = 2.0**-10
"""The network-output shift :meth:`EagerSide.gains` differences by: small against eps (order 1), large against
float32 rounding of the outputs it moves."""

SAMPLER_OPTIONS = ("snr", "corrector_steps", "coupling", "denoise_final", "order", "variant", "divergence", "probes",
                   "probe")


def bundle_model(bundle, model_spec: str | None = None) -> tuple[ScoreModel, VPSDE]:
    """The model ``bundle`` was exported from and its SDE, rebuilt from the manifest: ``model_spec`` is the user's;
    it defaults to ``model.source`` only where that is self-contained (a bundle never chooses code to run or files
    to read). The model must make ``model.sample_shape`` and, where the manifest records them, have
    ``model.weights_sha256``; else InputError naming the field."""
    m, manifest = bundle.manifest, bundle.root / "manifest.json"
    spec = model_spec
    if spec is None:
        if not self_contained(m.model.source):
            raise InputError(f"{manifest}: model.source is {m.model.source[:120]!r}; "
                             "a bundle's model is rebuilt on its own only if it is the shipped digits model or an "
                             "analytic gmm: name the eager model yourself with --model (its weights are checked "
                             "against model.weights_sha256)")
        spec = m.model.source
    try:
        sde = VPSDE(beta_min=m.sde.beta_min, beta_max=m.sde.beta_max, sampling_eps=m.sde.sampling_eps,
                    num_train_timesteps=m.sde.num_train_timesteps, std_formula=m.sde.std_formula)
    except (ValueError, TypeError) as e:  # a bundle is untrusted input: its values are checked where used
        raise InputError(f"{manifest}: field 'sde': the eager reference cannot rebuild the SDE: {first_line(e)}") \
            from None
    label = m.model.time_label  # "<S>t" for a network fed label S t (TimeLabelAdapter); "t" otherwise
    try:
        label_scale = float(label[:-1]) if label.endswith("t") and label != "t" else 999.0
    except ValueError:
        label_scale = 999.0
    try:
        model = load_model(spec, sde, sample_shape=tuple(m.model.sample_shape), label_scale=label_scale)
    except ModelSpecError as e:
        if model_spec is not None:
            raise InputError(str(e)) from None
        raise InputError(f"{manifest}: model.source {spec!r} cannot be rebuilt for the eager "
                         f"reference ({e}); name the model with --model") from None
    if tuple(model.sample_shape) != tuple(m.model.sample_shape):
        raise InputError(f"{manifest}: model.sample_shape is {m.model.sample_shape}, but "
                         f"{spec!r} makes {list(model.sample_shape)}")
    if m.model.weights_sha256 and m.model.weights_sha256 != model.weights_sha256:
        raise InputError(f"{manifest}: model.weights_sha256 is {m.model.weights_sha256}, but "
                         f"--model {spec!r} has weights {model.weights_sha256}: not the model this bundle holds")
    return model, sde


class EagerSide:
    """Runs a bundle's graphs as eager torch modules around the model :func:`bundle_model` rebuilds (``model_spec``:
    the user's, else a self-contained ``model.source``)."""

    def __init__(self, bundle, model_spec: str | None = None, dtype: torch.dtype = torch.float32) -> None:
        m, manifest = bundle.manifest, bundle.root / "manifest.json"
        model, sde = bundle_model(bundle, model_spec)
        spec = m.model.source if model_spec is None else model_spec
        params = dict(m.sampler.params)
        sampler = params.get("id")
        if sampler not in SAMPLERS:
            raise InputError(f"{manifest}: sampler.params.id {sampler!r} is not a sampler this "
                             f"vpsde can rebuild ({', '.join(SAMPLERS)})")
        options = {k: params[k] for k in SAMPLER_OPTIONS if k in params}
        if "denoise_final" in options:
            options["denoise_final"] = bool(options["denoise_final"])
        self._shift = 0.0  # added to every network output while gains() measures them
        self._rebuild = (bundle, spec)  # for the twins rounding_error() builds on first use
        self._twins: dict[torch.dtype, EagerSide] = {}
        self._last: tuple[str, dict[str, np.ndarray], list[torch.Tensor]] | None = None  # key, feed, network outputs
        model.register_forward_hook(self._network_output)
        self._model = model
        if m.sampler.grid == TUNED:  # tuned to the model at export: the bundle's schedule holds the grid
            options["edges"] = tuned_edges_in(m.schedule, options.get("denoise_final", False), sde)
        try:
            recipe = build_sampler(sampler, model, sde, m.sampler.steps, m.sampler.grid, **options)
        except (ValueError, TypeError) as e:
            raise InputError(f"{manifest}: fields 'sampler.grid' and 'sampler.params': the eager reference cannot "
                             f"rebuild sampler {sampler!r}: {first_line(e)}") from None
        rebuilt = {name: values.float().tolist() for name, values in recipe.schedule.items()}
        if rebuilt != {name: list(values) for name, values in m.schedule.items()}:
            differs = sorted(set(rebuilt) ^ set(m.schedule)) or [k for k in rebuilt if rebuilt[k] != list(m.schedule[k])]
            raise InputError(f"{manifest}: field 'schedule.{differs[0]}' is not what sampler "
                             f"{sampler!r} on the {m.sampler.grid!r} grid ({m.sampler.steps} steps, sampler.params) "
                             "gives: the eager reference would run another schedule")
        self.dtype = dtype
        self.arithmetic = str(dtype).removeprefix("torch.")  # "float64": parity knows only the other side errs
        self.graphs = {key: step.eval().to(dtype) for key, step in recipe.graphs.items()}
        self.inputs = {key: [s.name for s in g.inputs] for key, g in m.graphs.items()}
        self.outputs = {key: [s.name for s in g.outputs] for key, g in m.graphs.items()}
        self.name = f"eager torch {self.arithmetic} ({spec})"

    def gains(self, key: str, feed: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Per output of this call (``outputs``: its unshifted outputs on ``feed``): max |d output / d eps| when every
        network output of the call moves by the same amount, by a difference of :data:`GAIN_SHIFT`. The step's
        amplification of the network's rounding: its per-call bars scale by it (``verify/parity.py``). Where the
        last call ran this key on this feed and called the network once, its output is replayed, shifted, instead of
        being computed again (the same numbers: a step's one network call sees only the feed)."""
        replay = self._replayable(key, feed)
        self._shift = GAIN_SHIFT
        try:
            if replay is not None:
                self._model.forward = lambda *args, **kwargs: replay
            shifted = self(key, feed)
        finally:
            self._shift = 0.0
            self._model.__dict__.pop("forward", None)
        return {name: float(np.abs(shifted[name].astype(np.float64) - outputs[name]).max(initial=0.0)) / GAIN_SHIFT
                for name in outputs}

    def rounding_error(self, key: str, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Per output, float64 [B, ...]: the call in float32 arithmetic minus the same call in float64 (twins of this
        side built on first use; this side itself where its dtype is one of them)."""
        if not self._twins:
            self._twins = {dtype: self if self.dtype == dtype else EagerSide(*self._rebuild, dtype=dtype)
                           for dtype in (torch.float32, torch.float64)}
        f32, f64 = (self._twins[dtype]._run(key, feed) for dtype in (torch.float32, torch.float64))
        return {name: f32[name].detach().double().numpy() - f64[name].detach().numpy() for name in f64}

    def _network_output(self, module, args, out: torch.Tensor) -> torch.Tensor | None:
        """Forward hook on the model: keeps the call's network outputs; shifts them while gains() measures."""
        if self._last is not None and not self._shift:
            self._last[2].append(out)
        return out + self._shift if self._shift else None

    def _replayable(self, key: str, feed: Mapping[str, np.ndarray]) -> torch.Tensor | None:
        """The network output of the last call if it ran ``key`` on values equal to ``feed`` and called the network
        exactly once, outside any derivative of it (a ``forward_ad`` step also uses the network's tangents, which a
        replayed value does not carry); None otherwise."""
        if self._last is None or getattr(self.graphs[key], "forward_ad", False):
            return None
        last_key, last_feed, outputs = self._last
        same = last_key == key and len(outputs) == 1 and all(
            np.array_equal(feed[name], last_feed[name]) for name in self.inputs[key])
        return outputs[0] if same else None

    def __call__(self, key: str, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One call of graph ``key``; its outputs rounded to float32, as the graphs hand them on."""
        return {name: v.to(torch.float32).numpy() for name, v in self._run(key, feed).items()}

    @torch.no_grad()
    def _run(self, key: str, feed: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        if not self._shift:
            self._last = (key, {name: np.array(feed[name]) for name in self.inputs[key]}, [])
        args = [torch.from_numpy(np.ascontiguousarray(feed[name])).to(self.dtype) for name in self.inputs[key]]
        outs = self.graphs[key](*args)
        return dict(zip(self.outputs[key], outs if isinstance(outs, tuple) else (outs,)))
