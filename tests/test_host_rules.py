"""The rules both hosts enforce are the same numbers: the C++ host's constants (hosts/cpp/include/vpsde/*.hpp) are
read here and compared with the Python runtime's, so changing one side alone fails (docs/DESIGN.md, module map)."""

import re
from pathlib import Path

from vpsde.runtime.backends import MAX_THREADS
from vpsde.runtime.bundle import GRAPH_LIMIT
from vpsde.runtime.digest import SUMS_LIMIT
from vpsde.runtime.manifest import (FLOAT32_LIMIT, MANIFEST_LIMIT, MAX_CALLS, MAX_DEPTH, MAX_REPEAT,
                                    MAX_SAMPLE_NUMEL, MAX_STEPS, READABLE_VERSIONS)
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
              "kPhiloxId": PHILOX_ID, "kFloat32Limit": FLOAT32_LIMIT}
    assert {k: cpp.get(k) for k in python} == python  # the C++ host reads every version


def test_the_reader_sees_a_changed_constant(tmp_path, monkeypatch):
    """The comparison above cannot pass vacuously: a header with another limit reads differently."""
    import sys

    header = (INCLUDE / "manifest.hpp").read_text().replace("kMaxDepth = 32", "kMaxDepth = 33")
    (tmp_path / "manifest.hpp").write_text(header)
    monkeypatch.setattr(sys.modules[__name__], "INCLUDE", tmp_path)
    assert _cpp_constants()["kMaxDepth"] == 33
