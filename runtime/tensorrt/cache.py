"""The engine cache inside a bundle: ``engines/<graph>-<key>.plan`` plus ``<graph>-<key>.json``.

The key hashes everything an engine depends on: the graph's sha256, the TensorRT flavour and version, the
target (compute capabilities for TensorRT for RTX, the GPU for full TensorRT), the graph's precision and the
batch profile. An engine is used only when its recorded key equals the one wanted now and its bytes still
match the sha256 recorded beside it; anything else is rebuilt by ``vpsde build`` or refused with the reason.
Writes are atomic (temporary file + rename, the .json last), and builders of one bundle serialise on an
exclusive lock on ``engines/.lock``, so two processes never interleave writes to one engine.

Containment: graph keys are plain names (the manifest checks), ``engines/`` must be a real directory inside the
bundle and ``.lock`` a regular file (never a symlink, never opened for append through one), engine files are
read without following symlinks, and TensorRT parses the graph's checked bytes, not its path. Each record also
notes the digest of the bundle the engine was built from.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

from vpsde.runtime.atomic import atomic_path
from vpsde.runtime.bundle import Bundle
from vpsde.runtime.confine import open_for_lock, owned_dir, read_regular
from vpsde.runtime.digest import sha256_hex
from vpsde.runtime.errors import BundleError, VpsdeError
from vpsde.runtime.tensorrt.build import BatchProfile, build_engine
from vpsde.runtime.tensorrt.flavor import Flavor

ENGINE_DIR = "engines"
PLAN_LIMIT = 8 << 30  # bytes of one engine file
RECORD_LIMIT = 1 << 20


@dataclass(frozen=True)
class EngineKey:
    """What an engine was built from and for."""

    graph: str
    graph_sha256: str
    flavor: str
    version: str
    targets: tuple[str, ...]
    precision: str
    profile: str

    @classmethod
    def for_graph(cls, bundle: Bundle, graph: str, flavor: Flavor, targets: list[str], profile: BatchProfile) -> "EngineKey":
        spec = bundle.manifest.graphs[graph]
        return cls(graph, spec.sha256, flavor.name, flavor.version, tuple(targets), bundle.manifest.model.precision,
                   str(profile))

    @classmethod
    def from_record(cls, key: object) -> "EngineKey":
        """The key of an engine record's "key" object; TypeError unless every field is a string (targets: a list
        of strings)."""
        if not isinstance(key, dict) or not isinstance(key.get("targets"), list):
            raise TypeError("key: expected an object with a list of targets")
        fields = {k: v for k, v in key.items() if k != "targets"}
        if not all(isinstance(v, str) for v in fields.values()) or not all(isinstance(t, str) for t in key["targets"]):
            raise TypeError("key: every field must be a string")
        return cls(**fields, targets=tuple(key["targets"]))

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    def stem(self) -> str:
        return f"{self.graph}-{self.digest()}"


@dataclass(frozen=True)
class CachedEngine:
    plan: Path
    key: EngineKey
    built: bool  # False: found in the cache
    seconds: float


def engine_dir(bundle: Bundle) -> Path:
    """``BUNDLE/engines``, created if missing; refused if it is a symlink or not a directory."""
    return owned_dir(bundle.root, ENGINE_DIR, "the engine cache")


@contextmanager
def build_lock(directory: Path) -> Iterator[None]:
    """Exclusive advisory lock on ``directory/.lock`` (blocks until the other builder is done); the lock file is
    created without following a symlink."""
    fd = open_for_lock(directory / ".lock", "the engine cache's lock")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def check_engine(plan: Path, key: EngineKey) -> bytes:
    """The bytes of engine ``plan`` if it has a record of exactly ``key`` and its bytes match it (both read once,
    never through a symlink); else :class:`BundleError` with the reason."""
    meta_path = plan.with_suffix(".json")
    if not os.path.lexists(plan) or not os.path.lexists(meta_path):
        raise BundleError(f"{plan}: no engine for graph {key.graph!r} with this key; run `vpsde build`")
    try:
        meta = json.loads(read_regular(meta_path, RECORD_LIMIT, "the engine record"))
        recorded = EngineKey.from_record(meta["key"])
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise BundleError(f"{meta_path}: unreadable engine record ({type(e).__name__}); run `vpsde build --force`") from None
    if recorded != key:
        diff = {k: (v, getattr(key, k)) for k, v in asdict(recorded).items() if v != getattr(key, k)}
        raise BundleError(f"{plan}: stale or foreign engine, built for " +
                          ", ".join(f"{k} {old!r} (wanted {new!r})" for k, (old, new) in diff.items()) +
                          "; run `vpsde build` to rebuild it")
    data = read_regular(plan, PLAN_LIMIT, "the engine")
    if sha256_hex(data) != meta.get("plan_sha256"):
        raise BundleError(f"{plan}: the engine's sha256 does not match {meta_path.name}; it was modified or "
                          "half-written; run `vpsde build --force`")
    return data


def cached_keys(bundle: Bundle, graph: str) -> list[tuple[EngineKey, Path]]:
    """Every engine record of ``graph`` in the bundle's cache: (key, plan path)."""
    out: list[tuple[EngineKey, Path]] = []
    directory = bundle.root / ENGINE_DIR
    if directory.is_symlink() or not directory.is_dir():
        return out
    for meta in sorted(directory.glob(f"{graph}-*.json")):
        try:
            k = json.loads(read_regular(meta, RECORD_LIMIT, "the engine record"))["key"]
            out.append((EngineKey.from_record(k), meta.with_suffix(".plan")))
        except (VpsdeError, ValueError, KeyError, TypeError, RecursionError):
            continue  # unreadable records are reported by check_engine if they are ever chosen
    return out


def build_cached(bundle: Bundle, graph: str, flavor: Flavor, profile: BatchProfile, targets: list[str],
                 opt_level: int = 3, force: bool = False, log: Callable[[str], None] = lambda _: None) -> CachedEngine:
    """The engine of ``graph`` for this key: reused if the cache holds a valid one (and not ``force``), else
    built and written atomically under the bundle's build lock."""
    key = EngineKey.for_graph(bundle, graph, flavor, targets, profile)
    directory = engine_dir(bundle)
    plan = directory / f"{key.stem()}.plan"
    with build_lock(directory):
        if not force:
            try:
                check_engine(plan, key)
                return CachedEngine(plan, key, built=False, seconds=0.0)
            except BundleError as why:
                if plan.exists():
                    log(f"rebuilding: {why}")
        t0 = time.perf_counter()
        data = build_engine(flavor, bundle.graph_bytes(graph), bundle.graph_path(graph), profile, targets, opt_level,
                            directory / f"timing-{flavor.name}-{flavor.version}.cache")
        seconds = time.perf_counter() - t0
        with atomic_path(plan) as tmp:
            tmp.write_bytes(data)
        meta = {"key": asdict(key), "plan_sha256": hashlib.sha256(data).hexdigest(), "opt_level": opt_level,
                "bundle_digest": bundle.digest, "build_seconds": round(seconds, 3), "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        with atomic_path(plan.with_suffix(".json")) as tmp:
            tmp.write_text(json.dumps(meta, indent=2) + "\n")
    return CachedEngine(plan, key, built=True, seconds=seconds)
