"""json_depth (runtime/jsondepth.py), which guards both the manifest parser and the HTTP gate: compared with the depth
of what Python's json module parses, on random documents whose strings are full of brackets, quotes and backslashes,
read in random chunk sizes (so string state and backslash runs cross chunk boundaries)."""

from __future__ import annotations

import json

import numpy as np

from vpsde.runtime.jsondepth import json_depth


def parsed_depth(value) -> int:
    if isinstance(value, dict):
        return 1 + max((parsed_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((parsed_depth(v) for v in value), default=0)
    return 0


def random_document(rng: np.random.Generator, depth: int):
    def text() -> str:
        return "".join(rng.choice(list('[]{}"\\ab\n'), int(rng.integers(0, 12))))

    if depth == 0:
        return [float(rng.standard_normal()), text(), None, True][int(rng.integers(0, 4))]
    inner = [random_document(rng, depth - 1) for _ in range(int(rng.integers(1, 3)))]
    return {text(): inner[0], text() + "v": inner} if rng.random() < 0.5 else inner + [text()]


def test_json_depth_equals_the_parsed_depth_of_random_documents_with_bracket_strings():
    rng = np.random.default_rng()
    for _ in range(200):
        doc = random_document(rng, int(rng.integers(0, 9)))
        data = json.dumps(doc, ensure_ascii=bool(rng.integers(0, 2))).encode()
        want = parsed_depth(json.loads(data))
        for chunk in ((1, 2, 3) if len(data) < 500 else ()) + (int(rng.integers(4, 64)), 1 << 20):
            assert json_depth(data, chunk=chunk) == want, (data[:200], chunk)


def test_hostile_nesting_is_counted_and_brackets_in_strings_are_not():
    assert json_depth(b"[" * 1_000_000) == 1_000_000
    assert json_depth(b'{"id": "' + b"[" * 100 + b'", "inputs": [[1]]}') == 3
    assert json_depth(b'["\\\\", [[0]]]') == 3  # an escaped backslash does not escape the closing quote
    assert json_depth(b'["\\"[[[[", 0]') == 1  # an escaped quote does not end the string
    assert json_depth(b"") == 0
