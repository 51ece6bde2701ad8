"""The manifest's program run over buffers that stay where the backend keeps them (host memory for ONNX Runtime on
CPU, GPU memory for the CUDA execution provider and TensorRT), allocated once per batch size.

Nothing is copied between graph calls: x and every state (e.g. DPM-Solver++'s x0 history) live in two buffers
each, and a call reads the current one and writes the other (ping-pong), so each (graph, parities) pair is one
fixed binding, prepared once (and, where the backend replays CUDA graphs, captured once). Per call the host
uploads only what it owns: the step's schedule values (once per step) and the noise. Conditioning is uploaded
once per batch; the sample comes back once, at the end.

A backend provides a :class:`Device` (buffers, uploads, downloads) and, per graph, a runner with
``bind(buffers) -> launch``, where ``buffers`` maps every graph input and output name to a device buffer and
``launch()`` enqueues one call. What runs when is the :class:`~vpsde.runtime.program.Program`'s: the loop walks it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol

import numpy as np

from vpsde.runtime.errors import InputError, NonFiniteError
from vpsde.runtime.manifest import GraphSpec, Manifest
from vpsde.runtime.program import Program

NAN_GUARDS = ("step", "final", "off")
"""What the loop checks: every call's outputs (naming the step), the result only, or nothing."""
NAN_GUARD_CHOICES = ("auto", "locate", *NAN_GUARDS)
"""What a Sampler (and `vpsde sample --nan-guard`) takes: "locate" checks the result and re-runs a non-finite batch
with "step"; "auto" is "locate" on the CPU and "final" on a GPU."""


class Device(Protocol):
    """Where one backend keeps tensors. ``Buffer`` is the backend's own type (an OrtValue, a device pointer)."""

    name: str
    on_host: bool  # True when buffers are host memory (reading them back costs no transfer)

    def empty(self, shape: tuple[int, ...], dtype: str) -> Any:
        """An uninitialised buffer of ``shape`` and ``dtype`` (a numpy dtype name)."""

    def upload(self, dst: Any, src: np.ndarray) -> None:
        """Copy host ``src`` into ``dst`` (ordered before later launches); ``src`` may be reused on return."""

    def peek(self, src: Any) -> np.ndarray:
        """A host view of ``src`` after all enqueued work, valid until the next launch (read it, don't keep it)."""


class GraphRunner(Protocol):
    def bind(self, buffers: Mapping[str, Any]) -> Callable[[], None]:
        """A launch function for one graph call on exactly these buffers (one per input and output name)."""


@dataclass
class OpenBackend:
    """What a backend opened for one bundle: its ``device`` and one runner per graph key (here, beside the
    protocols they satisfy, so that backends and their loaders import it without importing each other)."""

    device: Any
    runners: Mapping[str, Any]


class _Workspace:
    """The buffers of one batch size: two per rolling value (x, states), one per other name."""

    def __init__(self, manifest: Manifest, program: Program, device: Device, batch: int) -> None:
        self.batch = batch
        self.rolling_of_output = program.rolling_of_output
        self.rolling = {name: [None, None] for name in program.rolling}
        self.fixed: dict[str, Any] = {}
        for graph in manifest.graphs.values():
            for spec in (*graph.inputs, *graph.outputs):
                shape = spec.shape_for(batch)
                rolling = spec.name if spec.name in self.rolling else self.rolling_of_output.get(spec.name)
                if rolling is not None:
                    pair = self.rolling[rolling]
                    for k in (0, 1):
                        pair[k] = pair[k] if pair[k] is not None else device.empty(shape, spec.dtype)
                elif spec.name not in self.fixed:
                    self.fixed[spec.name] = device.empty(shape, spec.dtype)
        self.launches: dict[tuple, Callable[[], None]] = {}

    def buffers_for(self, graph, parity: Mapping[str, int]) -> dict[str, Any]:
        """Every input and output of ``graph``: rolling inputs at their current parity, rolling outputs at the other."""
        out = {}
        for spec in graph.inputs:
            out[spec.name] = self.rolling[spec.name][parity[spec.name]] if spec.name in self.rolling \
                else self.fixed[spec.name]
        for spec in graph.outputs:
            rolling = self.rolling_of_output.get(spec.name)
            out[spec.name] = self.rolling[rolling][1 - parity[rolling]] if rolling is not None \
                else self.fixed[spec.name]
        return out

    def output(self, name: str, parity: Mapping[str, int]) -> Any:
        """The buffer holding the latest value of output ``name``."""
        rolling = self.rolling_of_output.get(name)
        return self.rolling[rolling][parity[rolling]] if rolling is not None else self.fixed[name]


class DeviceLoop:
    """Runs the program of ``manifest`` on ``runners`` (one per graph key) and ``device``; one instance per
    :class:`~vpsde.runtime.Sampler`, keeping the buffers and bindings of the last batch size."""

    def __init__(self, manifest: Manifest, runners: Mapping[str, GraphRunner], device: Device,
                 describe_graph: Callable[[str], str] = str) -> None:
        self.manifest, self.runners, self.device = manifest, runners, device
        self.program = Program.compile(manifest)
        self.describe_graph = describe_graph
        self._schedule_inputs = {key: self.program.inputs_of(key, "schedule") for key in manifest.graphs}
        self._ws: _Workspace | None = None

    def workspace(self, batch: int) -> _Workspace:
        if self._ws is None or self._ws.batch != batch:
            self._ws = None  # release the old buffers first
            self._ws = _Workspace(self.manifest, self.program, self.device, batch)
        return self._ws

    def launch_for(self, ws: _Workspace, graph: str, parity: Mapping[str, int]) -> Callable[[], None]:
        """The launch of ``graph`` on ``ws``'s buffers at ``parity`` (bound once per (graph, parities))."""
        key = (graph, *(parity[n] for n in ws.rolling))
        launch = ws.launches.get(key)
        if launch is None:
            launch = ws.launches[key] = self.runners[graph].bind(ws.buffers_for(self.manifest.graphs[graph], parity))
        return launch

    def run(self, x_T: np.ndarray, draw: Callable[[int], np.ndarray], cond: Mapping[str, np.ndarray],
            first_sample: int, nan_guard: str = "step", callback: Callable[[int, np.ndarray], None] | None = None,
            on_step: Callable[[], None] = lambda: None, steps: int | None = None) -> np.ndarray:
        """One batch: ``x_T`` float32 [batch, *sample_shape] is the prior sample; ``draw(call)`` returns noise
        call ``call`` (1, 2, ... in order); ``cond`` holds this batch's conditioning arrays. Returns the final
        output, float32 [batch, *sample_shape]. ``nan_guard``: "step" checks every call's outputs (naming the
        step), "final" only the result, "off" nothing. ``steps`` stops after that many steps (benchmarks: the
        output is then the trajectory's value there, not a sample)."""
        program, dev = self.program, self.device
        batch = int(x_T.shape[0])
        ws = self.workspace(batch)
        parity = {name: 0 for name in ws.rolling}
        dev.upload(ws.rolling["x"][0], x_T)
        for name in program.rolling[1:]:
            dev.upload(ws.rolling[name][0], np.zeros(x_T.shape, dtype=np.float32))
        for name, value in cond.items():
            dev.upload(ws.fixed[name], np.ascontiguousarray(value, dtype=np.float32))
        scalar = np.empty(batch, dtype=np.float32)
        last_key = ""
        for i in program.steps_to_run(steps):
            uploaded = set()  # schedule values go up once per step
            for call in program.calls:
                for name in self._schedule_inputs[call.graph]:
                    if name not in uploaded:
                        scalar.fill(program.schedule[name][i])
                        dev.upload(ws.fixed[name], scalar)
                        uploaded.add(name)
                for name, index in program.draws(call, i):
                    dev.upload(ws.fixed[name], draw(index))
                self.launch_for(ws, call.graph, parity)()
                for rolling in call.writes:
                    parity[rolling] ^= 1
                if nan_guard == "step":
                    self._check_finite(ws, call.graph, parity, i, first_sample)
                last_key = call.graph
            if callback is not None:
                callback(i, dev.peek(ws.rolling["x"][parity["x"]]).copy())
            on_step()
        result = dev.peek(ws.output(program.final, parity)).copy()
        if nan_guard != "off" and not np.isfinite(result).all():
            raise NonFiniteError(f"the final sample (output {program.final!r} of graph {last_key!r}, "
                                 f"{self.describe_graph(last_key)}) has NaN/Inf in samples {_bad_samples(result, first_sample)}; sample with "
                                 "--nan-guard step to find the step where it first appears")
        return result

    def _check_finite(self, ws: _Workspace, key: str, parity: Mapping[str, int], step: int,
                      first_sample: int) -> None:
        for spec in self.manifest.graphs[key].outputs:
            arr = self.device.peek(ws.output(spec.name, parity))
            if not np.isfinite(arr).all():
                raise NonFiniteError(
                    f"graph {key!r} ({self.describe_graph(key)}) produced NaN/Inf in output {spec.name!r} at step "
                    f"{step} (of 0..{self.program.steps - 1}, t = {self.program.schedule['t'][step]:.6g}), in "
                    f"samples {_bad_samples(arr, first_sample)}")


def check_feed(graph: GraphSpec, key: str, feed: Mapping[str, np.ndarray]) -> int:
    """Check a feed's names, dtypes and shapes against graph ``key``'s manifest entry; return its batch size."""
    names = {s.name for s in graph.inputs}
    if set(feed) != names:
        raise InputError(f"graph {key!r}: expected inputs {sorted(names)}, got {sorted(feed)}")
    batch = int(np.shape(feed["x"])[0]) if np.ndim(feed["x"]) else 0
    for spec in graph.inputs:
        arr, want = feed[spec.name], spec.shape_for(batch)
        if not isinstance(arr, np.ndarray) or arr.dtype != np.dtype(spec.dtype) or arr.shape != want:
            got = f"{arr.dtype} {arr.shape}" if isinstance(arr, np.ndarray) else type(arr).__name__
            raise InputError(f"graph {key!r} input {spec.name!r}: expected {spec.dtype} {want}, got {got}")
    if batch < 1:
        raise InputError(f"graph {key!r}: batch must be >= 1, got {batch}")
    return batch


def infer_once(runner: GraphRunner, device: Device, graph: GraphSpec, key: str,
               feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One checked call of one graph on host arrays (for tests and tools): fresh buffers, upload, launch, host
    copies of the outputs."""
    batch = check_feed(graph, key, feed)
    buffers = {s.name: device.empty(s.shape_for(batch), s.dtype) for s in (*graph.inputs, *graph.outputs)}
    for name, arr in feed.items():
        device.upload(buffers[name], arr)
    runner.bind(buffers)()
    return {s.name: device.peek(buffers[s.name]).copy() for s in graph.outputs}


def _bad_samples(arr: np.ndarray, first_sample: int) -> str:
    bad = np.unique(np.nonzero(~np.isfinite(arr.reshape(arr.shape[0], -1)))[0] + first_sample)
    return f"{bad[:8].tolist()}{' ...' if bad.size > 8 else ''}"
