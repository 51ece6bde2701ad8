"""The bundle manifest (``manifest.json``, schema version 2; version 1 still reads): typed, validated on read,
written atomically.

Every host (this runtime, the C++ host, a serving engine) drives a bundle from this file alone. Errors name
the file and the dotted field path, and say what was expected.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import types
import typing
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Union

from vpsde.runtime.atomic import atomic_path
from vpsde.runtime.confine import is_plain_name, read_regular
from vpsde.runtime.errors import BundleError
from vpsde.runtime.jsondepth import json_depth
from vpsde.runtime.noise import GENERATORS

FORMAT = "vpsde-bundle"
SCHEMA_VERSION = 2
"""The version a sampling bundle is written with; a task that needs a later one is written with that (TASKS)."""
READABLE_VERSIONS = (1, 2, 3)  # v1 = the Euler-Maruyama-only subset of v2 (no state, no conditioning); v3 = v2 + task
TASKS: dict[str, int] = {"sample": 1, "likelihood": 3}
"""What a bundle's program computes -> the first schema version that has it. "sample": x starts at the prior (noise
call 0) and the final output is the samples. "likelihood": x starts at the data the caller gives, and a row's sum of
the final output is the data point's log-density in nats (export/likelihood.py); older runtimes refuse the version
rather than sample from it."""
MANIFEST_NAME = "manifest.json"
DTYPES = ("float32", "float16", "bfloat16", "int64", "int32")
RESERVED_FILES = (MANIFEST_NAME, "SHA256SUMS")
# Bounds on what a manifest may ask for (a bundle is untrusted input): far above any real sampler, far below
# what would run for days or exhaust memory before the first graph call.
MANIFEST_LIMIT = 64 << 20  # bytes of manifest.json
MAX_DEPTH = 32  # JSON nesting (the schema needs 5)
MAX_STEPS = 100_000
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
"""model.precision values: the network's compute precision inside the graphs, from most to least precise."""
MAX_REPEAT = 1_000
MAX_CALLS = 1_000_000  # graph calls per sample: steps x sum of repeats (noise call indices must stay < 2^32)
MAX_SAMPLE_NUMEL = 1 << 28  # elements of one sample (1 GiB of float32)
FLOAT32_LIMIT = float.fromhex("0x1.ffffffp+127")
"""2^128 - 2^103: a float64 of smaller magnitude rounds to a finite float32, one at least this large to Infinity.
Schedule values go into the graphs as float32; both hosts refuse any they could not hold."""
IO_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")  # graph input/output names, schedule keys


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output: dtype name and shape, with a string (e.g. "batch") for a symbolic dimension."""

    name: str
    dtype: str
    shape: list[Union[int, str]]

    def shape_for(self, batch: int) -> tuple[int, ...]:
        """The concrete shape at ``batch`` samples (every symbolic dimension is the batch)."""
        return tuple(batch if isinstance(d, str) else int(d) for d in self.shape)


@dataclass(frozen=True)
class GraphSpec:
    """One ONNX graph of the bundle (one per step kind)."""

    file: str
    sha256: str
    opset: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


@dataclass(frozen=True)
class SDESpec:
    """The VP-SDE the graphs implement (metadata: the schedule arrays already carry what a host needs)."""

    kind: str
    beta_min: float
    beta_max: float
    sampling_eps: float
    num_train_timesteps: int
    std_formula: str


def valid_value_range(value_range) -> bool:
    """Whether ``value_range`` is a data range [lo, hi]: two finite numbers, lo < hi (``model.value_range``)."""
    return len(value_range) == 2 and all(math.isfinite(v) for v in value_range) and value_range[0] < value_range[1]


@dataclass(frozen=True)
class ModelSpec:
    """The score model fused into the graphs. ``sample_shape`` excludes the batch dimension; ``value_range``
    is the data range of image samples ([lo, hi] maps to pixel 0..255), null for non-image data;
    ``precision`` the network's compute precision inside the graphs ("fp32", "fp16", "bf16", or "int8": int8
    convolutions as QDQ pairs, the rest float32; graph IO and the SDE arithmetic are float32 either way)."""

    name: str
    sample_shape: list[int]
    time_label: str
    weights_sha256: Union[str, None] = None
    source: str = ""
    value_range: Union[list[float], None] = None
    precision: str = "fp32"


@dataclass(frozen=True)
class ProgramCall:
    """One graph call of a sampler step: the graph's key in ``graphs``, repeated ``repeat`` times."""

    graph: str
    repeat: int = 1


@dataclass(frozen=True)
class StateSpec:
    """Host-carried state between graph calls (e.g. DPM-Solver++'s previous data prediction): the host feeds
    its buffer to graph input ``input`` and replaces it with graph output ``output`` after every call of a
    graph that has that output. ``init``: its value before the first call ("zeros")."""

    input: str
    output: str
    init: str = "zeros"


@dataclass(frozen=True)
class SamplerSpec:
    """What to run: ``program`` is the sequence of graph calls made at every step, in order; ``final`` names
    the output of the last call that is the sample (``x_mean``: no noise added at the last step).

    ``state``: buffers carried between calls; ``conditioning``: graph inputs [batch, *sample_shape] the user
    supplies per sample (inpainting: ``known``, ``mask``); ``params``: what the sampler was exported with
    (e.g. ``snr``, ``corrector_steps``, ``coupling``: "batch" when a graph mixes samples of one batch, so
    results depend on how samples are batched); ``task``: what the program computes (:data:`TASKS`)."""

    name: str
    steps: int
    grid: str
    program: list[ProgramCall]
    final: str = "x_mean"
    state: list[StateSpec] = field(default_factory=list)
    conditioning: list[str] = field(default_factory=list)
    params: dict[str, Union[int, float, str]] = field(default_factory=dict)
    task: str = "sample"


@dataclass(frozen=True)
class NoiseSpec:
    """How the host draws noise. ``generator``: "philox4x32-10/box-muller/v1" (portable) or "torch".
    The prior x_T is noise call 0; every graph input named in ``inputs`` takes the next call index, counted
    over the program's calls in order and, within one call, in the order of ``inputs``."""

    generator: str
    inputs: list[str] = field(default_factory=lambda: ["noise"])
    prior: str = "call 0"
    per_call: str = "one draw per noise input of each graph call, counted in program order from 1"


@dataclass(frozen=True)
class Manifest:
    format: str
    schema_version: int
    sde: SDESpec
    model: ModelSpec
    sampler: SamplerSpec
    schedule: dict[str, list[float]]
    graphs: dict[str, GraphSpec]
    noise: NoiseSpec
    producer: dict[str, str] = field(default_factory=dict)

    # -- (de)serialisation --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The manifest as JSON data; ``sampler.task`` only where it is not "sample" (a sampling bundle reads as it
        did before tasks existed)."""
        data = dataclasses.asdict(self)
        if data["sampler"]["task"] == "sample":
            del data["sampler"]["task"]
        return data

    @classmethod
    def from_dict(cls, data: Any, source: str = MANIFEST_NAME) -> "Manifest":
        """Validate ``data`` (parsed JSON) field by field; raise :class:`BundleError` naming the field."""
        if not isinstance(data, dict):
            raise BundleError(f"{source}: expected a JSON object at the top level, got {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise BundleError(f"{source}: field 'format': expected {FORMAT!r}, got {data.get('format')!r}")
        version = data.get("schema_version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise BundleError(f"{source}: field 'schema_version': expected an integer, got {version!r}")
        if version not in READABLE_VERSIONS:
            raise BundleError(
                f"{source}: field 'schema_version': this runtime reads schema versions {READABLE_VERSIONS}, the "
                f"bundle has {version}; re-export the bundle or use a vpsde release that reads version {version}"
            )
        manifest = _convert(cls, data, source, "")
        manifest._check_consistency(source)
        return manifest

    def _check_consistency(self, source: str) -> None:
        def fail(where: str, what: str) -> BundleError:
            return BundleError(f"{source}: field '{where}': {what}")

        n = self.sampler.steps
        if not 1 <= n <= MAX_STEPS:
            raise fail("sampler.steps", f"expected 1..{MAX_STEPS}, got {n}")
        self._check_names(fail)
        if self.sampler.task not in TASKS:
            raise fail("sampler.task", f"expected one of {', '.join(map(repr, TASKS))}, got {self.sampler.task!r:.80}")
        if self.schema_version < TASKS[self.sampler.task]:
            raise fail("sampler.task", f"task {self.sampler.task!r} needs schema_version >= {TASKS[self.sampler.task]}, "
                                       f"the bundle has {self.schema_version}")
        if self.noise.generator not in GENERATORS:
            raise fail("noise.generator", f"expected one of {', '.join(map(repr, GENERATORS))}, got {self.noise.generator!r:.80}")
        vr = self.model.value_range
        if vr is not None and not valid_value_range(vr):
            raise fail("model.value_range", f"expected [lo, hi] with finite lo < hi, or null, got {vr!r:.80}")
        if self.model.precision not in PRECISIONS:
            raise fail("model.precision", f"expected one of {', '.join(map(repr, PRECISIONS))}, got "
                                          f"{self.model.precision!r:.80}")
        for key, values in self.schedule.items():
            if not all(abs(v) < FLOAT32_LIMIT for v in values):  # also refuses NaN
                raise fail(f"schedule.{key}", "expected finite float32 numbers, found NaN, Infinity or a magnitude "
                                              "past float32's 3.4e38")
        for key, values in self.schedule.items():
            if len(values) != n:
                raise BundleError(f"{source}: field 'schedule.{key}': expected {n} values (sampler.steps), got {len(values)}")
        if any(d >= 0 for d in self.schedule.get("dt", [])):
            raise BundleError(f"{source}: field 'schedule.dt': reverse-time steps must be negative")
        if not self.sampler.program:
            raise BundleError(f"{source}: field 'sampler.program': expected at least one graph call")
        for i, call in enumerate(self.sampler.program):
            if call.graph not in self.graphs:
                raise BundleError(f"{source}: field 'sampler.program[{i}].graph': {call.graph!r} is not in 'graphs' "
                                  f"(have {sorted(self.graphs)})")
            if not 1 <= call.repeat <= MAX_REPEAT:
                raise BundleError(f"{source}: field 'sampler.program[{i}].repeat': expected 1..{MAX_REPEAT}, got {call.repeat}")
        calls = n * sum(c.repeat for c in self.sampler.program)
        if calls > MAX_CALLS:
            raise fail("sampler.program", f"{n} steps x {calls // n} graph calls per step = {calls} calls per sample; "
                                          f"at most {MAX_CALLS} are accepted")
        shape = self.model.sample_shape
        if not shape or any(s < 1 for s in shape) or math.prod(shape) > MAX_SAMPLE_NUMEL:
            raise fail("model.sample_shape", f"expected positive sizes, at most {MAX_SAMPLE_NUMEL} elements in all, "
                                             f"got {shape}")
        for i, st in enumerate(self.sampler.state):
            if st.init != "zeros":
                raise BundleError(f"{source}: field 'sampler.state[{i}].init': expected 'zeros', got {st.init!r}")
        for key, g in self.graphs.items():
            for kind, specs in (("inputs", g.inputs), ("outputs", g.outputs)):
                for j, spec in enumerate(specs):
                    if spec.dtype not in DTYPES:
                        raise BundleError(f"{source}: field 'graphs.{key}.{kind}[{j}].dtype': expected one of "
                                          f"{DTYPES}, got {spec.dtype!r}")
                    if any(not isinstance(d, str) and d < 1 for d in spec.shape):  # same rule in hosts/cpp
                        raise BundleError(f"{source}: field 'graphs.{key}.{kind}[{j}].shape': expected positive sizes "
                                          f"or symbolic names, got {spec.shape}")
            for j, spec in enumerate(g.inputs):
                if self.input_role(spec.name) is None:
                    raise BundleError(
                        f"{source}: field 'graphs.{key}.inputs[{j}]': no source for input {spec.name!r}; a graph input "
                        "is 'x', a 'schedule' array, one of 'noise.inputs', a 'sampler.state' input or one of "
                        "'sampler.conditioning'")
            if "x_next" not in {o.name for o in g.outputs}:
                raise BundleError(f"{source}: field 'graphs.{key}.outputs': expected an output named 'x_next'")
        last = self.sampler.program[-1].graph
        if self.sampler.final not in {o.name for o in self.graphs[last].outputs}:
            raise BundleError(f"{source}: field 'sampler.final': graph {last!r} has no output {self.sampler.final!r}")

    def _check_names(self, fail: Callable[[str, str], BundleError]) -> None:
        """Graph keys and files are plain names (they become file names); IO names are identifiers; every graph
        input name has one role only (``noise.inputs`` naming ``x`` or a schedule array would change samples)."""
        files: dict[str, str] = {}
        for key, g in self.graphs.items():
            if not is_plain_name(key):
                raise fail(f"graphs.{key!r:.80}", "a graph key must be a plain name (letters, digits, '_', '.', '-'; "
                                                  "no '/', no leading '.'): it names engine files")
            if not is_plain_name(g.file) or g.file in RESERVED_FILES:
                raise fail(f"graphs.{key}.file", f"expected a plain file name inside the bundle (no '/', no '..', not "
                                                 f"{' or '.join(RESERVED_FILES)}), got {g.file!r:.80}")
            if g.file in files:
                raise fail(f"graphs.{key}.file", f"{g.file!r} is also the file of graph {files[g.file]!r}")
            files[g.file] = key
            if not re.fullmatch(r"[0-9a-f]{64}", g.sha256):
                raise fail(f"graphs.{key}.sha256", f"expected 64 lower-case hex digits, got {g.sha256!r:.80}")
            for kind, specs in (("inputs", g.inputs), ("outputs", g.outputs)):
                for j, spec in enumerate(specs):
                    if not IO_NAME.fullmatch(spec.name):
                        raise fail(f"graphs.{key}.{kind}[{j}].name", f"expected an identifier, got {spec.name!r:.80}")
        roles: dict[str, str] = {"x": "x"}
        for where, names in (("schedule", list(self.schedule)), ("noise.inputs", self.noise.inputs),
                             ("sampler.state", [s.input for s in self.sampler.state]),
                             ("sampler.conditioning", self.sampler.conditioning)):
            for name in names:
                if not IO_NAME.fullmatch(name):
                    raise fail(where, f"expected identifiers, got {name!r:.80}")
                if name in roles:
                    raise fail(where, f"{name!r} is already {'the sample x' if name == 'x' else 'in ' + roles[name]}; "
                                      "each graph input has exactly one source")
                roles[name] = where
        for i, st in enumerate(self.sampler.state):
            if not IO_NAME.fullmatch(st.output):
                raise fail(f"sampler.state[{i}].output", f"expected an identifier, got {st.output!r:.80}")

    def input_role(self, name: str) -> str | None:
        """Where a graph input's values come from: "x", "schedule", "noise", "state", "conditioning" (or None).
        Every role but "schedule" ([batch], one scalar per step) is a [batch, *sample_shape] tensor."""
        if name == "x":
            return "x"
        if name in self.schedule:
            return "schedule"
        if name in self.noise.inputs:
            return "noise"
        if name in {s.input for s in self.sampler.state}:
            return "state"
        if name in self.sampler.conditioning:
            return "conditioning"
        return None

    # -- files ----------------------------------------------------------------------------------------------
    @classmethod
    def read(cls, path: str | os.PathLike) -> "Manifest":
        """Read and validate ``path`` (a regular file of at most MANIFEST_LIMIT bytes)."""
        path = Path(path)
        if not os.path.lexists(path):
            raise BundleError(f"{path}: no manifest here; a bundle is a directory with {MANIFEST_NAME}")
        return cls.parse(read_regular(path, MANIFEST_LIMIT, "the manifest"), str(path))

    @classmethod
    def parse(cls, data: bytes, source: str = MANIFEST_NAME) -> "Manifest":
        """Validate manifest bytes: UTF-8 JSON nested at most MAX_DEPTH deep, then every field."""
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BundleError(f"{source}: not UTF-8 text (byte {e.start}); a manifest is UTF-8 JSON") from None
        depth = json_depth(data)
        if depth > MAX_DEPTH:
            raise BundleError(f"{source}: JSON nested {depth} deep; a manifest needs at most {MAX_DEPTH}")
        try:
            parsed = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:
            raise BundleError(f"{source}: not valid JSON ({e})") from None
        return cls.from_dict(parsed, source=source)

    def write(self, path: str | os.PathLike) -> None:
        """Write as JSON, atomically (temporary file in the same directory, then rename)."""
        atomic_write_text(Path(path), dumps_readable(self.to_dict()) + "\n")


def dumps_readable(data: Any) -> str:
    """JSON with indent 2, except that a list of scalars (schedule arrays, shapes, name lists) stays on one line.
    Done on the data, not on the text, so that no string value is ever rewritten."""
    marker = f"@@vpsde-list-{uuid.uuid4().hex}-"
    flat: list[str] = []

    def fold(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: fold(v) for k, v in value.items()}
        if isinstance(value, list):
            if all(v is None or isinstance(v, (str, int, float, bool)) for v in value):
                flat.append(json.dumps(value, separators=(", ", ": ")))
                return f"{marker}{len(flat) - 1}"
            return [fold(v) for v in value]
        return value

    text = json.dumps(fold(data), indent=2)
    return re.sub(rf'"{re.escape(marker)}(\d+)"', lambda m: flat[int(m.group(1))], text)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temporary file in the same directory, then rename)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


# -- generic, field-naming conversion of parsed JSON into the dataclasses above -------------------------------
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"an object of {_type_name(typing.get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return "an object"
    return {int: "an integer", float: "a number", str: "a string", type(None): "null"}.get(tp, str(tp))


def _required(f: dataclasses.Field) -> bool:
    """Whether a manifest must have field ``f`` (it has no default)."""
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def field_types(tp: Any = None) -> dict[str, Any]:
    """The manifest's field types as JSON data, one node per type: {"type": "object" | "list" | "map" | "union" |
    "int" | "number" | "string" | "null", "name": what a message says is expected, "of": the element type(s),
    "fields": [[name, required, type], ...]}. The C++ host checks manifests against this table
    (hosts/cpp/src/manifest_types.inc, written by hosts/cpp/write_manifest_types.py), so both hosts type every
    field alike."""
    tp = Manifest if tp is None else tp
    node: dict[str, Any] = {"name": _type_name(tp)}
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        node.update(type="union", of=[field_types(a) for a in typing.get_args(tp)])
    elif origin is list:
        node.update(type="list", of=field_types(typing.get_args(tp)[0]))
    elif origin is dict:
        node.update(type="map", of=field_types(typing.get_args(tp)[1]))
    elif dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        node.update(type="object", fields=[
            [f.name, _required(f), field_types(hints[f.name])] for f in dataclasses.fields(tp)])
    else:
        node["type"] = {int: "int", float: "number", str: "string", type(None): "null"}[tp]
    return node


def _convert(tp: Any, value: Any, source: str, where: str) -> Any:
    def fail() -> BundleError:
        return BundleError(f"{source}: field '{where or '<root>'}': expected {_type_name(tp)}, got {value!r:.80}")

    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _convert(arg, value, source, where)
            except BundleError:
                continue
        raise fail()
    if origin is list:
        if not isinstance(value, list):
            raise fail()
        (arg,) = typing.get_args(tp)
        return [_convert(arg, v, source, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise fail()
        arg = typing.get_args(tp)[1]
        return {str(k): _convert(arg, v, source, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise fail()
        hints = typing.get_type_hints(tp)
        kwargs = {}
        for f in dataclasses.fields(tp):
            sub = f"{where}.{f.name}" if where else f.name
            if f.name not in value:
                if _required(f):
                    raise BundleError(f"{source}: field '{sub}' is missing ({_type_name(hints[f.name])} expected)")
                continue
            kwargs[f.name] = _convert(hints[f.name], value[f.name], source, sub)
        return tp(**kwargs)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail()
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail()
        return value
    if tp is type(None):
        if value is not None:
            raise fail()
        return None
    if not isinstance(value, tp):
        raise fail()
    return value
