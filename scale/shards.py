"""A sharded sample set on disk: ``DIR/shards/<first>-<num>.npy`` files and ``DIR/index.json``.

Sample s of a bundle is a pure function of (bundle digest, seed, s) with the portable noise, so a run over
[first_sample, first_sample + num) is cut into index ranges (shards) that any worker may compute in any order.
The index is rewritten atomically after every finished shard, so a run killed at any point resumes: shards whose
files still match their recorded sha256 are kept, the rest are computed again. A run is identified by its
bundle digest, seed, sample range, shard size and generator; a rerun with any of them changed is refused.

No Ray here: this module is the on-disk format, shared by the Ray driver and the reader.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from vpsde.runtime.atomic import atomic_path
from vpsde.runtime.bundle import sha256_file
from vpsde.runtime.errors import InputError, VpsdeError

INDEX_NAME = "index.json"
SHARD_DIR = "shards"
FORMAT = "vpsde-samples"
VERSION = 1


class RunMismatch(VpsdeError):
    """The output directory holds a run of another bundle, seed, range, shard size or generator."""


@dataclass(frozen=True)
class Shard:
    """Samples ``first .. first + num - 1``, stored in ``file`` (relative to the run directory)."""

    first: int
    num: int

    @property
    def file(self) -> str:
        return f"{SHARD_DIR}/{self.first:020d}-{self.num:06d}.npy"


@dataclass(frozen=True)
class RunKey:
    """What a run's samples depend on: equal keys give equal samples, shard by shard."""

    bundle_digest: str
    seed: int
    first_sample: int
    num: int
    shard_size: int
    generator: str
    sample_shape: tuple[int, ...]

    def shards(self) -> list[Shard]:
        """[first_sample, first_sample + num) cut into ranges of ``shard_size`` (the last may be shorter)."""
        end = self.first_sample + self.num
        return [Shard(s, min(self.shard_size, end - s)) for s in range(self.first_sample, end, self.shard_size)]


@dataclass
class Index:
    """``DIR/index.json``: the run's key, the finished shards with the sha256 of their files, and whether all of
    them are there (``complete``)."""

    key: RunKey
    done: dict[int, str] = field(default_factory=dict)  # shard first -> sha256 of its file

    @property
    def complete(self) -> bool:
        return all(s.first in self.done for s in self.key.shards())

    def to_json(self) -> str:
        shards = [{"first": s.first, "num": s.num, "file": s.file, "sha256": self.done[s.first]}
                  for s in self.key.shards() if s.first in self.done]
        key = asdict(self.key)
        key["sample_shape"] = list(self.key.sample_shape)
        return json.dumps({"format": FORMAT, "version": VERSION, **key, "dtype": "float32",
                           "complete": self.complete, "shards": shards}, indent=1) + "\n"

    def write(self, run_dir: Path) -> None:
        with atomic_path(run_dir / INDEX_NAME) as tmp:
            tmp.write_text(self.to_json())

    @classmethod
    def read(cls, run_dir: Path) -> "Index":
        path = run_dir / INDEX_NAME
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("format") != FORMAT or data.get("version") != VERSION:
                raise ValueError(f"format {data.get('format')!r} version {data.get('version')!r}")
            key = RunKey(data["bundle_digest"], int(data["seed"]), int(data["first_sample"]), int(data["num"]),
                         int(data["shard_size"]), data["generator"], tuple(int(d) for d in data["sample_shape"]))
            done = {int(s["first"]): str(s["sha256"]) for s in data["shards"]}
        except FileNotFoundError:
            raise VpsdeError(f"{path}: no index here; {run_dir} is not a sample run directory") from None
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise VpsdeError(f"{path}: not a vpsde sample index ({type(e).__name__}: {e})") from None
        return cls(key, done)


def open_run(run_dir: Path, key: RunKey) -> tuple[Index, list[Shard]]:
    """The index of the run in ``run_dir`` (created if there is none) and the shards still to compute: every
    shard without a file that matches its recorded sha256. Refuses a directory that holds another run."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / SHARD_DIR).mkdir(exist_ok=True)
    if not (run_dir / INDEX_NAME).exists():
        index = Index(key)
        index.write(run_dir)
        return index, key.shards()
    index = Index.read(run_dir)
    if index.key != key:
        diff = ", ".join(f"{k} {getattr(index.key, k)!r} (now {getattr(key, k)!r})" for k in asdict(key)
                         if getattr(index.key, k) != getattr(key, k))
        raise RunMismatch(f"{run_dir} holds samples of another run: {diff}; use another --out, or the same "
                          "bundle, seed, range and shard size to resume it")
    kept = {}
    for shard in key.shards():
        sha = index.done.get(shard.first)
        if sha is not None and (run_dir / shard.file).is_file() and sha256_file(run_dir / shard.file) == sha:
            kept[shard.first] = sha
    index.done = kept
    index.write(run_dir)
    return index, [s for s in key.shards() if s.first not in kept]


def write_shard(run_dir: Path, shard: Shard, samples: np.ndarray) -> str:
    """Write one shard's samples (float32 [num, *sample_shape]) atomically; return the sha256 of the file."""
    if samples.dtype != np.float32 or samples.shape[0] != shard.num:
        raise InputError(f"shard {shard.file}: expected float32 with {shard.num} samples, got {samples.dtype} "
                         f"{samples.shape}")
    path = run_dir / shard.file
    with atomic_path(path, suffix=".tmp.npy") as tmp:
        np.save(tmp, samples, allow_pickle=False)
        sha = sha256_file(tmp)
    return sha


class ShardedSamples:
    """The samples of a finished run, in index order, memory-mapped shard by shard: ``len()``, integer and slice
    indexing (step 1), and ``np.asarray()`` for all of them at once. Every shard's sha256 is checked on open."""

    def __init__(self, run_dir: str | os.PathLike, verify: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.index = Index.read(self.run_dir)
        if not self.index.complete:
            missing = sum(1 for s in self.index.key.shards() if s.first not in self.index.done)
            raise VpsdeError(f"{self.run_dir}: the run is not complete ({missing} shards missing); rerun the same "
                             "command to finish it")
        self._shards = []
        for shard in self.index.key.shards():
            path = self.run_dir / shard.file
            if verify and sha256_file(path) != self.index.done[shard.first]:
                raise VpsdeError(f"{path}: sha256 does not match {INDEX_NAME}; rerun the same command to redo it")
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
            if arr.shape != (shard.num, *self.index.key.sample_shape) or arr.dtype != np.float32:
                raise VpsdeError(f"{path}: holds {arr.dtype} {arr.shape}, expected float32 "
                                 f"{(shard.num, *self.index.key.sample_shape)}")
            self._shards.append(arr)
        self._starts = np.cumsum([0] + [len(a) for a in self._shards])

    @property
    def first_sample(self) -> int:
        return self.index.key.first_sample

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __iter__(self) -> Iterator[np.ndarray]:
        for arr in self._shards:
            yield from arr

    def __getitem__(self, item: int | slice) -> np.ndarray:
        if isinstance(item, slice):
            start, stop, step = item.indices(len(self))
            if step != 1:
                raise IndexError("sharded samples take slices with step 1")
            return self._range(start, stop)
        i = int(item) + (len(self) if int(item) < 0 else 0)
        if not 0 <= i < len(self):
            raise IndexError(f"sample {item} out of range for {len(self)} samples")
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        return np.asarray(self._shards[k][i - self._starts[k]])

    def _range(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((max(0, stop - start), *self.index.key.sample_shape), dtype=np.float32)
        for k, arr in enumerate(self._shards):
            lo, hi = max(start, self._starts[k]), min(stop, self._starts[k + 1])
            if lo < hi:
                out[lo - start:hi - start] = arr[lo - self._starts[k]:hi - self._starts[k]]
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self._range(0, len(self))
        return out if dtype is None else out.astype(dtype)


def load_samples(run_dir: str | os.PathLike, verify: bool = True) -> ShardedSamples:
    """The samples of a finished sharded run (``vpsde sample --ray``) in index order, memory-mapped."""
    return ShardedSamples(run_dir, verify)
