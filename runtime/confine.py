"""Paths that come from a bundle stay inside it: plain names, symlinks resolved then checked, files read once.

A bundle is untrusted input (docs/DESIGN.md, "Trust boundary"). Every name a manifest gives (graph keys, graph
files) must be a plain name; every path vpsde derives from a bundle is resolved (symlinks followed) and must
still lie inside the bundle's resolved root; files are opened without following a final symlink, must be regular
files (a FIFO or a device would hang or stream forever) and are read whole, once, with a size cap, so the bytes
that are checked are the bytes that are used.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path

from vpsde.runtime.errors import BundleError

# a plain name: one path component, no leading dot (no ".", "..", hidden files), printable ASCII only
PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


def is_plain_name(name: str) -> bool:
    """True for one path component of letters, digits, '_', '.', '-', not starting with '.' or '-'."""
    return isinstance(name, str) and PLAIN_NAME.fullmatch(name) is not None


def inside(root: Path, relative: str, what: str) -> Path:
    """``root / relative`` with every symlink resolved, checked to lie inside ``root`` (also resolved).

    Raises :class:`BundleError` naming ``what`` (e.g. "graphs.em.file in BUNDLE/manifest.json") when the path
    is absolute, climbs with "..", or resolves outside the bundle (a symlink that leaves it)."""
    rel = Path(relative)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise BundleError(f"{what}: expected a path inside the bundle, got {relative!r}")
    real_root = Path(os.path.realpath(root))
    real = Path(os.path.realpath(real_root / rel))
    if real != real_root and real_root not in real.parents:
        raise BundleError(f"{what}: {root / rel} is a symlink that leaves the bundle; a bundle's files must lie "
                          "inside its directory")
    return real


def read_regular(path: Path, limit: int, what: str) -> bytes:
    """The whole content of ``path``, which must be a regular file of at most ``limit`` bytes (opened without
    following a final symlink and without blocking, so a FIFO fails instead of hanging). :class:`BundleError`
    names ``what`` and the path otherwise."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise BundleError(f"{path}: {what} is missing") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise BundleError(f"{path}: {what} is a symlink; expected a regular file") from None
        raise BundleError(f"{path}: cannot open {what}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode) else \
                "not a regular file"
            raise BundleError(f"{path}: {what} is {kind}; expected a regular file")
        if st.st_size > limit:
            raise BundleError(f"{path}: {what} is {st.st_size} bytes; at most {limit} are accepted")
        chunks, total = [], 0
        while chunk := os.read(fd, 1 << 20):
            total += len(chunk)
            if total > limit:  # grew while being read
                raise BundleError(f"{path}: {what} is over {limit} bytes; at most {limit} are accepted")
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as e:
        raise BundleError(f"{path}: cannot read {what}: {e.strerror}") from None
    finally:
        os.close(fd)


def owned_dir(root: Path, name: str, what: str) -> Path:
    """The directory ``root/name`` (created if missing), refused if it is a symlink or not a directory: vpsde
    writes engine caches, locks and sample shards there, and must never be redirected outside ``root``."""
    path = root / name
    try:
        path.mkdir(exist_ok=True)
    except FileExistsError:
        pass  # a file or a dangling symlink: reported below
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise BundleError(f"{path}: {what} is {'a symlink' if stat.S_ISLNK(st.st_mode) else 'not a directory'}; "
                          f"vpsde writes only to a real directory inside {root}: remove it and run again")
    inside(root, name, what)
    return path


def open_for_lock(path: Path, what: str) -> int:
    """A file descriptor of the lock file ``path``, created if missing, never through a symlink."""
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise BundleError(f"{path}: {what} is a symlink; vpsde never writes through one: remove it") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise BundleError(f"{path}: {what} is not a regular file; remove it")
    return fd
