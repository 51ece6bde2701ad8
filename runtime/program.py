"""A bundle's program, compiled once from its manifest: the one statement of what every driver runs.

A sampling program (``sampler.task`` "sample") starts at the prior x_T, noise call 0; a likelihood program starts at
the caller's data, and noise call 0 is not drawn (see ``manifest.TASKS``). Each step makes the manifest's graph calls in order (repeats expanded); each call
feeds x, its graph's schedule inputs (``schedule[name][step]``, one value per row), one fresh noise call per noise
input (counted from 1 in program order and, within a call, in the order of ``noise.inputs``), the current state
and the conditioning; then every output that rolls over replaces its value: ``x_next`` -> x, each state's output
-> its input. States start at zeros. The result is output ``sampler.final`` of the last call.

The drivers — the device loop (``runtime/loop.py``), parity's trajectories and int8 calibration (host arrays,
:class:`HostTrajectory`), the benchmark's replay and the :class:`~vpsde.runtime.Sampler` — walk a
:class:`Program`; none restates it. ``hosts/cpp/src/program.cpp`` is its C++ twin.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from vpsde.runtime.manifest import Manifest

ROLES = ("x", "schedule", "noise", "state", "conditioning")
"""Where a graph input's values come from (:meth:`Manifest.input_role`): every role but "schedule" (one value per
row, [batch]) is a [batch, *sample_shape] tensor."""


@dataclass(frozen=True)
class StepCall:
    """One graph call of a step: graph key, its noise inputs with their call offsets within the step, and the
    rolling values (x, states) its outputs replace."""

    graph: str
    noise: tuple[tuple[str, int], ...]
    writes: tuple[str, ...]


@dataclass(frozen=True)
class Program:
    """The compiled program (see the module docstring); build it with :meth:`compile`."""

    steps: int
    calls: tuple[StepCall, ...]
    """One step's graph calls, in order, repeats expanded."""
    roles: Mapping[str, Mapping[str, str]]
    """Graph key -> input name -> role (one of :data:`ROLES`)."""
    rolling: tuple[str, ...]
    """The values carried from call to call: "x", then each state's input name."""
    rolling_of_output: Mapping[str, str]
    """Graph output name -> the rolling value it replaces."""
    schedule: Mapping[str, np.ndarray]
    """Schedule name -> float64 [steps]."""
    final: str
    noise_calls_per_step: int
    task: str = "sample"

    @classmethod
    def compile(cls, manifest: Manifest) -> "Program":
        rolling_of_output = {"x_next": "x", **{s.output: s.input for s in manifest.sampler.state}}
        roles = {key: {spec.name: manifest.input_role(spec.name) for spec in graph.inputs}
                 for key, graph in manifest.graphs.items()}
        calls, offset = [], 0
        for entry in manifest.sampler.program:
            graph = manifest.graphs[entry.graph]
            writes = tuple(rolling_of_output[s.name] for s in graph.outputs if s.name in rolling_of_output)
            for _ in range(entry.repeat):
                noise = []
                for name in manifest.noise.inputs:
                    if roles[entry.graph].get(name) == "noise":
                        noise.append((name, offset))
                        offset += 1
                calls.append(StepCall(entry.graph, tuple(noise), writes))
        return cls(steps=manifest.sampler.steps, calls=tuple(calls), roles=roles,
                   rolling=("x", *(s.input for s in manifest.sampler.state)), rolling_of_output=rolling_of_output,
                   schedule={k: np.asarray(v, dtype=np.float64) for k, v in manifest.schedule.items()},
                   final=manifest.sampler.final, noise_calls_per_step=offset, task=manifest.sampler.task)

    def noise_call(self, step: int, offset: int) -> int:
        """The noise call index of offset ``offset`` within step ``step``'s calls."""
        return 1 + step * self.noise_calls_per_step + offset

    def steps_to_run(self, steps: int | None = None) -> range:
        """Step indices 0 .. min(steps, the program's) - 1 (default: all)."""
        return range(self.steps if steps is None else min(steps, self.steps))

    def draws(self, call: StepCall, step: int) -> list[tuple[str, int]]:
        """``call``'s noise inputs at ``step`` with the noise call index each takes."""
        return [(name, self.noise_call(step, offset)) for name, offset in call.noise]

    def inputs_of(self, graph: str, role: str) -> list[str]:
        """Graph ``graph``'s inputs of ``role``, in graph order."""
        return [name for name, r in self.roles[graph].items() if r == role]


class HostTrajectory:
    """The program on host arrays for one batch: the rolling values, each call's feed, outputs rolled over.
    Parity's two trajectories and int8 calibration are drivers of it."""

    def __init__(self, program: Program, x_T: np.ndarray, conditioning: Mapping[str, np.ndarray] | None = None) -> None:
        self.program = program
        self.values = {name: x_T.copy() if name == "x" else np.zeros_like(x_T) for name in program.rolling}
        self.conditioning = dict(conditioning or {})
        self.last: dict[str, np.ndarray] = {}

    def feed(self, step: int, call: StepCall, noise: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The inputs of ``call`` at ``step``: ``noise`` maps each of its noise inputs to its drawn array."""
        batch = self.values["x"].shape[0]
        out = {}
        for name, role in self.program.roles[call.graph].items():
            if role in ("x", "state"):
                out[name] = self.values[name]
            elif role == "schedule":
                out[name] = np.full(batch, self.program.schedule[name][step], dtype=np.float32)
            elif role == "noise":
                out[name] = noise[name]
            else:
                out[name] = self.conditioning[name]
        return out

    def advance(self, outputs: Mapping[str, np.ndarray]) -> None:
        """Roll ``outputs`` of the call just made over (x_next -> x, state outputs -> state inputs)."""
        self.last = dict(outputs)
        for name, value in outputs.items():
            rolling = self.program.rolling_of_output.get(name)
            if rolling is not None:
                self.values[rolling] = value

    @property
    def result(self) -> np.ndarray:
        """Output ``sampler.final`` of the last call."""
        return self.last[self.program.final]
