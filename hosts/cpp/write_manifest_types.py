"""Write hosts/cpp/src/manifest_types.inc, the manifest's field types for the C++ host, from the Python runtime's
dataclasses (vpsde.runtime.manifest.field_types): one table, so both hosts type every field alike. Run it after
changing a manifest dataclass; tests/test_host_rules.py fails while the file is out of date.

    .venv/bin/python hosts/cpp/write_manifest_types.py
"""

from __future__ import annotations

import json
from pathlib import Path

TARGET = Path(__file__).parent / "src" / "manifest_types.inc"


def render() -> str:
    """The file's text: a C++ raw string literal holding the table as compact JSON."""
    from vpsde.runtime.manifest import field_types

    table = json.dumps(field_types(), separators=(",", ":"))
    return ("// The manifest's field types (vpsde/runtime/manifest.py's field_types), written by\n"
            "// hosts/cpp/write_manifest_types.py: do not edit; tests/test_host_rules.py checks it is current.\n"
            f'R"json({table})json"\n')


if __name__ == "__main__":
    TARGET.write_text(render())
    print(f"wrote {TARGET}")
