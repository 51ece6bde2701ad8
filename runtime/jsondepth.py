"""How deep JSON nests, read off its bytes before any parser sees them: a document of a few million ``[`` makes a
recursive parser overflow its stack. Used on manifests (``runtime/manifest.py``) and on HTTP request bodies in
front of tritonserver (``serving/gate.py``)."""

from __future__ import annotations

import numpy as np

_QUOTE, _BACKSLASH = ord('"'), ord("\\")
_OPEN, _CLOSE = (ord("["), ord("{")), (ord("]"), ord("}"))


def json_depth(data: bytes, chunk: int = 1 << 20) -> int:
    """The deepest nesting of objects and arrays in JSON ``data`` (UTF-8 bytes), brackets inside strings not
    counted, read ``chunk`` bytes at a time (memory O(chunk)). Exact for valid JSON; for invalid JSON exact up to
    the first byte a parser rejects, after which no parser reads on."""
    depth = deepest = 0
    in_string = 0  # carried across chunks: inside a string at the chunk's start (0 or 1)
    carried = 0  # backslashes ending the previous chunk
    for start in range(0, len(data), chunk):
        b = np.frombuffer(data, np.uint8, count=min(chunk, len(data) - start), offset=start)
        opens = (b == _OPEN[0]) | (b == _OPEN[1])
        brackets = np.flatnonzero(opens | (b == _CLOSE[0]) | (b == _CLOSE[1]))
        quotes = np.flatnonzero(b == _QUOTE)
        backslash = b == _BACKSLASH
        if carried or backslash.any():  # drop the quotes that an odd run of backslashes escapes
            pos = np.arange(len(b))
            plain = np.maximum.accumulate(np.where(backslash, -1, pos))  # last non-backslash at or before each byte
            before = np.concatenate(([-1], plain[:-1]))[quotes]
            run = quotes - 1 - before + np.where(before < 0, carried, 0)
            quotes = quotes[run % 2 == 0]
            carried = int(len(b) - 1 - plain[-1] + (carried if plain[-1] < 0 else 0))
        outside = (np.searchsorted(quotes, brackets) + in_string) % 2 == 0  # real quotes before each bracket
        running = np.cumsum(np.where(opens[brackets], 1, -1)[outside]) + depth
        if len(running):
            deepest, depth = max(deepest, int(running.max())), int(running[-1])
        in_string = (in_string + len(quotes)) % 2
    return deepest
