"""A sharded run on disk: ``DIR/shards/<first>-<num>.npy`` files and ``DIR/index.json``.

Sample s of a bundle is a pure function of (bundle digest, seed, s) with the portable noise, and so is the log
p of data point s under a likelihood bundle (its probes are noise of sample s) given the data, so a run over
[first_sample, first_sample + num) is cut into index ranges (shards) that any worker may compute in any order.
The index is rewritten atomically after every finished shard, so a run killed at any point resumes: shards whose
files still match their recorded sha256 are kept, the rest are computed again. A run is identified by its
bundle digest, seed, range, shard size, generator, result dtype and (likelihood runs) the data's sha256; a rerun
with any of them changed is refused. A shard holds samples (float32 [num, *sample_shape]) or log-likelihoods
(float64 [num]).

The run directory gets the bundle's rules (docs/DESIGN.md, trust boundary): ``shards/`` must be a real directory,
the index and every shard are opened without following a symlink and must be regular files, a shard is read from
the descriptor whose bytes were hashed, and an index may name at most :data:`MAX_SHARDS` shards.

No Ray here: this module is the on-disk format, shared by the Ray driver and the reader.
"""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from vpsde.runtime.atomic import atomic_path
from vpsde.runtime.bundle import sha256_file
from vpsde.runtime.confine import owned_dir, read_regular
from vpsde.runtime.errors import BundleError, InputError, VpsdeError

INDEX_NAME = "index.json"
SHARD_DIR = "shards"
FORMAT = "vpsde-samples"
VERSION = 1
MAX_SHARDS = 1_000_000
"""Most shards one run may have (a run of more is refused before any list of them is built)."""
MAX_INDEX_BYTES = 256 << 20


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


DTYPES = ("float32", "float64")
"""Shard dtypes: samples (float32), log-likelihoods (float64)."""


@dataclass(frozen=True)
class RunKey:
    """What a run's results depend on: equal keys give equal results, shard by shard. ``sample_shape`` is the
    shape of one result (a sample's; () for a log-likelihood); ``data_sha256`` is :func:`data_digest` of the
    points a likelihood run integrates ("" for sampling)."""

    bundle_digest: str
    seed: int
    first_sample: int
    num: int
    shard_size: int
    generator: str
    sample_shape: tuple[int, ...]
    dtype: str = "float32"
    data_sha256: str = ""

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
        if not key["data_sha256"]:
            del key["data_sha256"]
        return json.dumps({"format": FORMAT, "version": VERSION, **key, "complete": self.complete,
                           "shards": shards}, indent=1) + "\n"

    def write(self, run_dir: Path) -> None:
        with atomic_path(run_dir / INDEX_NAME) as tmp:
            tmp.write_text(self.to_json())

    @classmethod
    def read(cls, run_dir: Path) -> "Index":
        path = run_dir / INDEX_NAME
        if not os.path.lexists(path):
            raise VpsdeError(f"{path}: no index here; {run_dir} is not a sample run directory")
        try:
            data = json.loads(read_regular(path, MAX_INDEX_BYTES, "the sample index").decode("utf-8"))
            if data.get("format") != FORMAT or data.get("version") != VERSION:
                raise ValueError(f"format {data.get('format')!r} version {data.get('version')!r}")
            key = RunKey(data["bundle_digest"], _integer(data, "seed"), _integer(data, "first_sample"),
                         _integer(data, "num"), _integer(data, "shard_size"), data["generator"],
                         tuple(int(d) for d in data["sample_shape"]), _choice(data, "dtype", DTYPES),
                         _hex_digest(data, "data_sha256"))
            check_run_size(key.num, key.shard_size)
            done = {int(s["first"]): str(s["sha256"]) for s in data["shards"]}
        except BundleError as e:
            raise VpsdeError(str(e)) from None
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise VpsdeError(f"{path}: not a vpsde sample index ({type(e).__name__}: {e})") from None
        return cls(key, done)


def _integer(data: dict, field: str) -> int:
    value = data[field]
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"field {field!r}: expected an integer >= 0, got {value!r}")
    return value


def _choice(data: dict, field: str, allowed: tuple[str, ...]) -> str:
    value = data[field]
    if value not in allowed:
        raise ValueError(f"field {field!r}: expected one of {', '.join(allowed)}, got {value!r}")
    return value


def _hex_digest(data: dict, field: str) -> str:
    """An optional sha256 (64 lowercase hex digits); "" when absent."""
    value = data.get(field, "")
    if value and not (isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)):
        raise ValueError(f"field {field!r}: expected a sha256 (64 hex digits), got {value!r}")
    return value


def data_digest(points: np.ndarray) -> str:
    """sha256 of a likelihood run's data: its dtype, shape and C-order bytes."""
    points = np.ascontiguousarray(points)
    sha = hashlib.sha256(f"{points.dtype.str} {points.shape}\n".encode())
    sha.update(memoryview(points).cast("B"))
    return sha.hexdigest()


def check_run_size(num: int, shard_size: int) -> None:
    """A run of ``num`` samples in shards of ``shard_size``: both positive, at most :data:`MAX_SHARDS` shards."""
    if shard_size < 1 or num < 1:
        raise ValueError(f"num {num} and shard_size {shard_size}: expected both >= 1")
    if -(-num // shard_size) > MAX_SHARDS:
        raise ValueError(f"num {num} in shards of {shard_size} is more than {MAX_SHARDS} shards")


def _open_shard(path: Path, digest: bool = True) -> tuple[int, str | None]:
    """An open descriptor of shard file ``path`` (not followed if a symlink; a regular file) and the sha256 of its
    bytes (None unless ``digest``); :class:`VpsdeError` naming the path otherwise."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        what = "is a symlink; vpsde reads only the files it wrote" if e.errno == errno.ELOOP else \
            f"cannot be opened ({e.strerror})"
        raise VpsdeError(f"{path}: shard {what}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise VpsdeError(f"{path}: shard is not a regular file")
        if not digest:
            return fd, None
        sha = hashlib.sha256()
        while chunk := os.read(fd, 1 << 20):
            sha.update(chunk)
    except BaseException:
        os.close(fd)
        raise
    return fd, sha.hexdigest()


def shard_matches(path: Path, sha256: str) -> bool:
    """Whether ``path`` is a regular file (not a symlink) whose sha256 is ``sha256``."""
    try:
        fd, sha = _open_shard(path)
    except VpsdeError:
        return False
    os.close(fd)
    return sha == sha256


def _map_shard(path: Path, sha256: str | None, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """Shard ``path`` memory-mapped read-only from the descriptor whose bytes matched ``sha256`` (None: not
    checked): a .npy of ``dtype`` and ``shape`` (no pickled objects: the header is parsed, nothing else)."""
    fd, sha = _open_shard(path, digest=sha256 is not None)
    try:
        if sha != sha256:
            raise VpsdeError(f"{path}: sha256 does not match {INDEX_NAME}; rerun the same command to redo it")
        os.lseek(fd, 0, os.SEEK_SET)
        with os.fdopen(os.dup(fd), "rb") as f:
            try:
                version = np.lib.format.read_magic(f)
                read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                               (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                if read_header is None:
                    raise ValueError(f".npy format version {version}")
                shape_read, fortran, dtype_read = read_header(f)
            except (ValueError, OSError, SyntaxError) as e:
                raise VpsdeError(f"{path}: not a .npy array ({e})") from None
            offset = f.tell()
        want = np.dtype(dtype).newbyteorder("<")
        if dtype_read != want or fortran or tuple(shape_read) != shape:
            raise VpsdeError(f"{path}: holds {dtype_read} {tuple(shape_read)}{' (Fortran order)' if fortran else ''}, "
                             f"expected {dtype} {shape}")
        size, nbytes = os.fstat(fd).st_size, want.itemsize * int(np.prod(shape))
        if size != offset + nbytes:
            raise VpsdeError(f"{path}: {size} bytes, expected {offset + nbytes}")
        mapped = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)
    return np.frombuffer(mapped, want, int(np.prod(shape)), offset).reshape(shape)


def open_run(run_dir: Path, key: RunKey) -> tuple[Index, list[Shard]]:
    """The index of the run in ``run_dir`` (created if there is none) and the shards still to compute: every
    shard without a file that matches its recorded sha256. Refuses a directory that holds another run."""
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        check_run_size(key.num, key.shard_size)
        owned_dir(run_dir, SHARD_DIR, "the shard directory")
    except ValueError as e:
        raise InputError(str(e)) from None
    except BundleError as e:
        raise VpsdeError(str(e)) from None
    if not os.path.lexists(run_dir / INDEX_NAME):
        index = Index(key)
        index.write(run_dir)
        return index, key.shards()
    index = Index.read(run_dir)
    if index.key != key:
        diff = ", ".join(f"{k} {getattr(index.key, k)!r} (now {getattr(key, k)!r})" for k in asdict(key)
                         if getattr(index.key, k) != getattr(key, k))
        raise RunMismatch(f"{run_dir} holds another run: {diff}; use another --out, or the same bundle, seed, "
                          "range, shard size (and data) to resume it")
    kept = {}
    for shard in key.shards():
        sha = index.done.get(shard.first)
        if sha is not None and shard_matches(run_dir / shard.file, sha):
            kept[shard.first] = sha
    index.done = kept
    index.write(run_dir)
    return index, [s for s in key.shards() if s.first not in kept]


def discard_empty_run(run_dir: Path) -> None:
    """Remove what :func:`open_run` created for a new run that then wrote no shard: its index and its (empty) shard
    directory, so that a run that failed to start leaves nothing behind."""
    (run_dir / INDEX_NAME).unlink(missing_ok=True)
    try:
        (run_dir / SHARD_DIR).rmdir()
    except OSError:  # not empty or not there: not ours to remove
        pass


def write_shard(run_dir: Path, shard: Shard, samples: np.ndarray, dtype: str = "float32") -> str:
    """Write one shard's results (``dtype`` [num, *shape]) atomically; return the sha256 of the file."""
    if samples.dtype != np.dtype(dtype) or samples.ndim < 1 or samples.shape[0] != shard.num:
        raise InputError(f"shard {shard.file}: expected {dtype} with {shard.num} results, got {samples.dtype} "
                         f"{samples.shape}")
    path = run_dir / shard.file
    with atomic_path(path, suffix=".tmp.npy") as tmp:
        np.save(tmp, samples, allow_pickle=False)
        sha = sha256_file(tmp)
    return sha


class ShardedSamples:
    """The results of a finished run (samples, or log-likelihoods), in index order, memory-mapped shard by shard:
    ``len()``, integer and slice indexing (step 1), and ``np.asarray()`` for all of them at once. Every shard's
    sha256 is checked on open."""

    def __init__(self, run_dir: str | os.PathLike, verify: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.index = Index.read(self.run_dir)
        if not self.index.complete:
            missing = sum(1 for s in self.index.key.shards() if s.first not in self.index.done)
            raise VpsdeError(f"{self.run_dir}: the run is not complete ({missing} shards missing); rerun the same "
                             "command to finish it")
        self._shards = []
        for shard in self.index.key.shards():
            shape = (shard.num, *self.index.key.sample_shape)
            sha = self.index.done[shard.first] if verify else None
            self._shards.append(_map_shard(self.run_dir / shard.file, sha, shape, self.index.key.dtype))
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
        out = np.empty((max(0, stop - start), *self.index.key.sample_shape), dtype=self.index.key.dtype)
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
