"""The bundle digest: one sha256 that covers every byte a host reads from a bundle.

``BUNDLE/SHA256SUMS`` lists ``manifest.json`` and every graph file the manifest names, one line each in the
format of coreutils' ``sha256sum`` (``<64 hex>  <name>``, sorted by name), so ``sha256sum -c SHA256SUMS`` checks a
bundle without vpsde. The bundle digest is the sha256 of that file's bytes. The manifest is hashed as bytes, the
very bytes a host parses, so no JSON canonicalisation can differ between hosts (Python and C++), and every value
in it (schedule, parameters, shapes) is covered. A user pins a bundle by its digest (``--expect-digest``); a
signature over SHA256SUMS (as release archives sign theirs) can be added without changing the format.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from vpsde.runtime.errors import BundleError

SUMS_NAME = "SHA256SUMS"
SUMS_LIMIT = 1 << 16  # bytes: a few lines
_LINE = re.compile(r"([0-9a-f]{64})  (\S+)")
DIGEST_HEX = re.compile(r"[0-9a-f]{64}")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def format_sums(hashes: dict[str, str]) -> bytes:
    """SHA256SUMS content for ``hashes`` (file name -> sha256 hex)."""
    return "".join(f"{hashes[name]}  {name}\n" for name in sorted(hashes)).encode("ascii")


def parse_sums(data: bytes, source: Path) -> dict[str, str]:
    """SHA256SUMS bytes -> {name: sha256 hex}; :class:`BundleError` naming the line on anything else."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise BundleError(f"{source}: not ASCII; expected lines '<sha256>  <file name>'") from None
    out: dict[str, str] = {}
    lines = text.split("\n")
    if lines[-1] != "":
        raise BundleError(f"{source}: the last line does not end with a newline; the file is truncated or edited")
    for number, line in enumerate(lines[:-1], 1):
        match = _LINE.fullmatch(line)
        if match is None:
            raise BundleError(f"{source}: line {number}: expected '<64 lower-case hex>  <file name>', got {line!r:.80}")
        if match.group(2) in out:
            raise BundleError(f"{source}: line {number}: {match.group(2)!r} is listed twice")
        out[match.group(2)] = match.group(1)
    if list(out) != sorted(out):
        raise BundleError(f"{source}: lines are not sorted by file name, as vpsde writes them")
    return out


def check_digest_text(text: str, where: str) -> str:
    """A digest given by a user (``--expect-digest``): 64 lower-case hex digits."""
    value = text.strip().lower()
    if not DIGEST_HEX.fullmatch(value):
        raise BundleError(f"{where}: expected a bundle digest of 64 hex digits (as `vpsde inspect` prints), got {text!r:.80}")
    return value
