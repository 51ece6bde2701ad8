"""The engine cache inside a bundle: ``engines/<graph>-<key>.plan`` plus ``<graph>-<key>.json``.

The key hashes everything an engine depends on: the graph's sha256, the TensorRT flavour and version, the
target (compute capabilities for TensorRT for RTX, the GPU for full TensorRT), the graph's precision and the
batch profile. An engine is used only when its recorded key equals the one wanted now and its bytes still
match the sha256 recorded beside it; anything else is rebuilt by ``vpsde build`` or refused with the reason.
Writes are atomic (temporary file + rename, the .json last), and builders of one bundle serialise on an
exclusive lock on ``engines/.lock``, so two processes never interleave writes to one engine.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

from vpsde.runtime.atomic import atomic_path
from vpsde.runtime.bundle import Bundle, sha256_file
from vpsde.runtime.errors import BundleError
from vpsde.runtime.tensorrt.build import BatchProfile, build_engine
from vpsde.runtime.tensorrt.flavor import Flavor

ENGINE_DIR = "engines"


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


@contextmanager
def build_lock(engine_dir: Path) -> Iterator[None]:
    """Exclusive advisory lock on ``engine_dir/.lock`` (blocks until the other builder is done)."""
    engine_dir.mkdir(exist_ok=True)
    with open(engine_dir / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def check_engine(plan: Path, key: EngineKey) -> None:
    """Raise :class:`BundleError` unless ``plan`` has a record of exactly ``key`` and its bytes match it."""
    meta_path = plan.with_suffix(".json")
    if not plan.is_file() or not meta_path.is_file():
        raise BundleError(f"{plan}: no engine for graph {key.graph!r} with this key; run `vpsde build`")
    try:
        meta = json.loads(meta_path.read_text())
        recorded = EngineKey(**{**meta["key"], "targets": tuple(meta["key"]["targets"])})
    except (ValueError, KeyError, TypeError) as e:
        raise BundleError(f"{meta_path}: unreadable engine record ({e}); run `vpsde build --force`") from None
    if recorded != key:
        diff = {k: (v, getattr(key, k)) for k, v in asdict(recorded).items() if v != getattr(key, k)}
        raise BundleError(f"{plan}: stale or foreign engine, built for " +
                          ", ".join(f"{k} {old!r} (wanted {new!r})" for k, (old, new) in diff.items()) +
                          "; run `vpsde build` to rebuild it")
    if sha256_file(plan) != meta.get("plan_sha256"):
        raise BundleError(f"{plan}: the engine's sha256 does not match {meta_path.name}; it was modified or "
                          "half-written; run `vpsde build --force`")


def cached_keys(bundle: Bundle, graph: str) -> list[tuple[EngineKey, Path]]:
    """Every engine record of ``graph`` in the bundle's cache: (key, plan path)."""
    out = []
    for meta in sorted((bundle.root / ENGINE_DIR).glob(f"{graph}-*.json")):
        try:
            k = json.loads(meta.read_text())["key"]
            out.append((EngineKey(**{**k, "targets": tuple(k["targets"])}), meta.with_suffix(".plan")))
        except (ValueError, KeyError, TypeError):
            continue  # unreadable records are reported by check_engine if they are ever chosen
    return out


def build_cached(bundle: Bundle, graph: str, flavor: Flavor, profile: BatchProfile, targets: list[str],
                 opt_level: int = 3, force: bool = False, log: Callable[[str], None] = lambda _: None) -> CachedEngine:
    """The engine of ``graph`` for this key: reused if the cache holds a valid one (and not ``force``), else
    built and written atomically under the bundle's build lock."""
    key = EngineKey.for_graph(bundle, graph, flavor, targets, profile)
    engine_dir = bundle.root / ENGINE_DIR
    plan = engine_dir / f"{key.stem()}.plan"
    with build_lock(engine_dir):
        if not force:
            try:
                check_engine(plan, key)
                return CachedEngine(plan, key, built=False, seconds=0.0)
            except BundleError as why:
                if plan.exists():
                    log(f"rebuilding: {why}")
        t0 = time.perf_counter()
        data = build_engine(flavor, bundle.graph_path(graph), profile, targets, opt_level,
                            engine_dir / f"timing-{flavor.name}-{flavor.version}.cache")
        seconds = time.perf_counter() - t0
        with atomic_path(plan) as tmp:
            tmp.write_bytes(data)
        meta = {"key": asdict(key), "plan_sha256": hashlib.sha256(data).hexdigest(), "opt_level": opt_level,
                "build_seconds": round(seconds, 3), "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        with atomic_path(plan.with_suffix(".json")) as tmp:
            tmp.write_text(json.dumps(meta, indent=2) + "\n")
    return CachedEngine(plan, key, built=True, seconds=seconds)
