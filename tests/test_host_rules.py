"""The rules both hosts enforce are the same: the C++ host's constants (hosts/cpp/include/vpsde/*.hpp) are read here
and compared with the Python runtime's, so changing one side alone fails (docs/DESIGN.md, module map); its table of
field types is the Python dataclasses'; and edited manifests get the same verdict from both hosts."""

import re
from pathlib import Path

import pytest

from vpsde.runtime.backends import MAX_THREADS
from vpsde.runtime.bundle import GRAPH_LIMIT
from vpsde.runtime.digest import SUMS_LIMIT
from vpsde.runtime.manifest import (FLOAT32_LIMIT, MANIFEST_LIMIT, MAX_CALLS, MAX_DEPTH, MAX_REPEAT,
                                    MAX_SAMPLE_NUMEL, MAX_STEPS, PRECISIONS, READABLE_VERSIONS)
from vpsde.runtime.noise import PHILOX_ID

INCLUDE = Path(__file__).parent.parent / "hosts" / "cpp" / "include" / "vpsde"


def _cpp_constants() -> dict[str, int | str]:
    """name -> value of every `inline constexpr` integer, hexadecimal float or string in the C++ host's headers."""
    out: dict[str, int | str] = {}
    for header in INCLUDE.glob("*.hpp"):
        for decl in re.findall(r"inline constexpr [^=;]*?(k\w+ = [^;]+);", header.read_text()):
            for part in re.split(r",\s*(?=k\w+ =)", decl):
                name, value = (x.strip() for x in part.split("=", 1))
                if value.startswith('"'):
                    out[name] = value.strip('"')
                elif re.fullmatch(r"0x[0-9a-f.]+p[+-]\d+", value):
                    out[name] = float.fromhex(value)
                else:
                    expr = re.sub(r"std::u?int\d+_t\{(\d+)\}", r"\1", value).replace("ull", "")
                    out[name] = int(eval(expr, {"__builtins__": {}}))  # noqa: S307 - integer literals and shifts
    return out


def test_both_hosts_enforce_the_same_limits_and_names():
    cpp = _cpp_constants()
    python = {"kManifestLimit": MANIFEST_LIMIT, "kSumsLimit": SUMS_LIMIT, "kGraphLimit": GRAPH_LIMIT,
              "kMaxDepth": MAX_DEPTH, "kMaxSteps": MAX_STEPS, "kMaxRepeat": MAX_REPEAT, "kMaxCalls": MAX_CALLS,
              "kMaxSampleNumel": MAX_SAMPLE_NUMEL, "kMaxThreads": MAX_THREADS, "kSchemaVersion": max(READABLE_VERSIONS),
              "kPhiloxId": PHILOX_ID, "kFloat32Limit": FLOAT32_LIMIT, "kPrecisions": " ".join(PRECISIONS)}
    assert {k: cpp.get(k) for k in python} == python  # the C++ host reads every version


def test_the_reader_sees_a_changed_constant(tmp_path, monkeypatch):
    """The comparison above cannot pass vacuously: a header with another limit reads differently."""
    import sys

    header = (INCLUDE / "manifest.hpp").read_text().replace("kMaxDepth = 32", "kMaxDepth = 33")
    (tmp_path / "manifest.hpp").write_text(header)
    monkeypatch.setattr(sys.modules[__name__], "INCLUDE", tmp_path)
    assert _cpp_constants()["kMaxDepth"] == 33


def test_the_cpp_hosts_field_types_are_the_python_dataclasses():
    """hosts/cpp/src/manifest_types.inc is what write_manifest_types.py writes from today's dataclasses."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("write_manifest_types", INCLUDE.parent.parent / "write_manifest_types.py")
    writer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(writer)
    assert writer.TARGET.read_text() == writer.render(), "run hosts/cpp/write_manifest_types.py"


@pytest.fixture(scope="module")
def small_bundles(tmp_path_factory):
    """Mixture bundles of several program shapes: one graph, two graphs with repeats, carried state, conditioning."""
    from vpsde.export import VPSDE, export_bundle, load_model

    root = tmp_path_factory.mktemp("edited")
    cases = {"em": ("gmm", {"steps": 5}), "pc": ("gmm", {"steps": 30, "corrector_steps": 2}),
             "unipc": ("gmm", {"steps": 4}), "inpaint": ("gmm:dim=3", {"steps": 4})}
    return {name: export_bundle(load_model(model, VPSDE()), root / name, sampler=name, log=lambda _: None,
                                **options).root for name, (model, options) in cases.items()}


def _field_paths(node, prefix=()):
    """Every path into parsed JSON (lists: their first two elements)."""
    if prefix:
        yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _field_paths(value, prefix + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node[:2]):
            yield from _field_paths(value, prefix + (i,))


def _verdicts(source: Path, data: dict, host: Path, work: Path) -> tuple[str | None, str | None]:
    """``source`` (a bundle) with manifest ``data``, re-signed, and one sample drawn by each host: (Python's
    refusal, the C++ host's refusal), None where a host drew it. A C++ refusal must be exit 2 in at most two lines
    (its message, maybe ONNX Runtime's own)."""
    import json
    import shutil

    import numpy as np
    from conftest import reseal, run_host

    from vpsde.runtime import Sampler, VpsdeError

    bundle = work / "b"
    shutil.rmtree(bundle, ignore_errors=True)
    shutil.copytree(source, bundle)
    (bundle / "manifest.json").write_text(json.dumps(data))
    reseal(bundle)
    conditioning, cond_args = None, []
    if source.name == "inpaint":  # the mixture of 3 dimensions: one known row, a mask
        conditioning = {"known": np.array([[0.5, -0.25, 0.1]], np.float32), "mask": np.array([1, 0, 1], np.float32)}
        for name, value in conditioning.items():
            np.save(work / f"{name}.npy", value)
            cond_args += ["--cond", f"{name}={work / f'{name}.npy'}"]
    try:
        Sampler(bundle, progress=False, threads=1).sample(1, seed=0, conditioning=conditioning)
        python = None
    except VpsdeError as e:
        python = str(e)
    r = run_host(host / "vpsde-sample", bundle, "--num", 1, "--threads", 1, *cond_args, "--out", work / "x.npy",
                 timeout=60)
    assert r.returncode in (0, 2) and len(r.stderr.strip().splitlines()) <= 2, r.stderr[-500:]
    return python, (r.stderr.strip() if r.returncode else None)


WRONG_TYPES = ["x", 1.5, None, [], {}, True, 7]


def test_both_hosts_give_every_field_the_same_verdict(small_bundles, host, tmp_path):
    """Each field of a real manifest, in turn, replaced by a value of each wrong type (or one of the right type),
    the bundle re-signed: both hosts draw a sample or both refuse. Before the C++ host checked the Python
    dataclasses' types (manifest_types.inc), it ran bundles whose descriptive fields (sde, noise.prior,
    sampler.params, producer, ...) Python refused."""
    import json

    original = json.loads((small_bundles["em"] / "manifest.json").read_text())
    disagree = []
    for path in _field_paths(original):
        for value in WRONG_TYPES:
            data = json.loads(json.dumps(original))
            parent = data
            for key in path[:-1]:
                parent = parent[key]
            if parent[path[-1]] == value and type(parent[path[-1]]) is type(value):
                continue
            parent[path[-1]] = value
            python, cpp = _verdicts(small_bundles["em"], data, host, tmp_path)
            if (python is None) != (cpp is None):
                disagree.append(f"{'.'.join(map(str, path))} = {value!r}: python {python!r:.120}, C++ {cpp!r:.120}")
    assert not disagree, "\n".join(disagree)


EDGE_VALUES = [0, -1, 1.5, 1e300, "", "x", None, [], {}, True, [1], "batch", "float16", "zeros"]


def test_both_hosts_agree_on_randomly_edited_manifests(small_bundles, host, tmp_path):
    """Seeded random edits of one or two fields (an edge value, or a value taken from elsewhere in the same
    manifest: the right type in the wrong place), the bundle re-signed, and one sample drawn by each host: both
    draw it or both refuse it, in one line. Found the schedule values past float32 and the graph IO the C++ host
    did not compare with the file (0.5.14)."""
    import json
    import random

    rng = random.Random(20261208)
    disagree = []
    for _ in range(120):
        name = rng.choice(sorted(small_bundles))
        data = json.loads((small_bundles[name] / "manifest.json").read_text())
        edits = []
        for _ in range(rng.choice([1, 1, 2])):
            paths = list(_field_paths(data))
            path = rng.choice(paths)
            donor = data
            for key in rng.choice(paths):
                donor = donor[key]
            value = json.loads(json.dumps(donor)) if rng.random() < 0.5 else rng.choice(EDGE_VALUES)
            parent = data
            for key in path[:-1]:
                parent = parent[key]
            parent[path[-1]] = value
            edits.append(f"{'.'.join(map(str, path))} = {json.dumps(value)[:60]}")
        python, cpp = _verdicts(small_bundles[name], data, host, tmp_path)
        if (python is None) != (cpp is None):
            disagree.append(f"{name} {edits}: python {python!r:.150}, C++ {cpp!r:.150}")
    assert not disagree, "\n".join(disagree)
