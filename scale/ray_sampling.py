"""Sampling a bundle, or the log-likelihoods of a data set, on a Ray cluster: shards of the index range on Ray
actors, written by the driver.

Why actors (not Ray Data, not plain tasks): a worker's expensive state is its :class:`~vpsde.runtime.Sampler`
(ONNX Runtime sessions, or TensorRT engines and CUDA buffers), which must be made once per worker process and
reused for every shard it computes. An actor holds exactly that; Ray restarts a killed actor and retries its
in-flight calls (``max_restarts``, ``max_task_retries``), so vpsde schedules nothing and retries nothing itself.
Ray Data's ``map_batches`` would add a dataset layer whose batches are not our shards and whose output would still
have to be re-cut into files named by sample range.

The bundle travels in Ray's object store as its checked files (no shared file system needed); each worker writes
them to a private temporary directory and loads them with ``expect_digest``, so a worker samples only the bundle
the driver checked. A likelihood run's data travels the same way, once (each worker integrates its shards' rows).
Workers return results; only the driver writes, shard by shard, atomically, and records each finished shard in the
index, so a killed driver resumes where it stopped.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from vpsde.runtime.bundle import Bundle
from vpsde.runtime.errors import BackendUnavailable, InputError, VpsdeError, first_line
from vpsde.runtime.likelihood import check_points
from vpsde.runtime.noise import TORCH_ID
from vpsde.runtime.progress import progress as progress_bar
from vpsde.runtime.request import check_request, count
from vpsde.scale.shards import (INDEX_NAME, Index, RunKey, Shard, ShardedSamples, data_digest, discard_empty_run,
                                open_run, write_shard)


def bundle_payload(bundle: Bundle) -> dict[str, bytes]:
    """Every file a host reads from ``bundle``, by name, as checked bytes (what the workers receive)."""
    return bundle.files()


class ShardWorker:
    """One worker process: the bundle from ``payload`` in a private directory, checked against ``digest``, and
    one Sampler reused for every shard. Plain Python (Ray wraps it as an actor), so it runs without Ray too."""

    def __init__(self, payload: Mapping[str, bytes], digest: str, backend: str = "onnxruntime",
                 device: str | None = None, threads: int | None = None, batch_size: int | None = None) -> None:
        from vpsde.runtime import Sampler
        from vpsde.runtime.atomic import locked_temp, sweep_stale

        parent = Path(os.environ.get("TMPDIR", "/tmp"))
        name = f"vpsde-worker-bundle-{digest[:16]}"
        sweep_stale(parent, name)  # bundles of workers that were killed
        self.root, self._lock = locked_temp(parent, name, "", make_dir=True)
        for file, data in payload.items():
            if "/" in file or file.startswith("."):
                raise InputError(f"bundle payload names {file!r}; expected plain file names")
            (self.root / file).write_bytes(data)
        self.bundle = Bundle.load(self.root, expect_digest=digest)
        self.sampler = Sampler(self.bundle, backend=backend, device=device, threads=threads, progress=False)
        self.batch_size = batch_size

    def sample(self, first: int, num: int, seed: int, generator: str | None,
               conditioning: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
        """Samples ``first .. first + num - 1``: float32 [num, *sample_shape] with timing and who made them."""
        t0 = time.perf_counter()
        samples = self.sampler.sample(num, seed, first_sample=first, batch_size=self.batch_size or num, generator=generator,
                                      conditioning=conditioning)
        return self._result(first, num, samples, t0)

    def log_likelihood(self, first: int, points: np.ndarray, lo: int, num: int, seed: int) -> dict[str, Any]:
        """log p in nats, float64 [num], of rows ``lo .. lo + num - 1`` of ``points`` (the run's data), which are
        inputs ``first .. first + num - 1``, in batches as ``Sampler.log_likelihood`` makes them (``batch_size``,
        default 64 on the CPU); with timing and who computed them."""
        t0 = time.perf_counter()
        logp = self.sampler.log_likelihood(points[lo:lo + num], seed, first_sample=first, batch_size=self.batch_size)
        return self._result(first, num, logp, t0)

    def _result(self, first: int, num: int, values: np.ndarray, t0: float) -> dict[str, Any]:
        return {"first": first, "num": num, "values": values, "seconds": time.perf_counter() - t0,
                "worker": os.getpid(), "host": os.uname().nodename, "bundle_root": str(self.root),
                "torch_imported": "torch" in sys.modules}


@dataclass
class RayRunReport:
    """What a run did: shards computed and reused, and per worker (pid@host): results (``unit``) and seconds."""

    run_dir: Path
    computed: int
    reused: int
    per_worker: dict[str, tuple[int, float]]
    torch_on_workers: bool
    unit: str = "samples"

    def lines(self) -> list[str]:
        out = [f"{self.computed} shards computed, {self.reused} reused from an earlier run"]
        for worker, (n, secs) in sorted(self.per_worker.items()):
            out.append(f"  worker {worker}: {n} {self.unit} in {secs:.2f} s ({n / max(secs, 1e-9):.1f} {self.unit}/s)")
        return out


def sample_on_ray(bundle: Bundle | str | os.PathLike, num: int, seed: int, out: str | os.PathLike, *,
                  first_sample: int = 0, shard_size: int = 1024, workers: int = 2, worker_cpus: float = 1,
                  worker_gpus: float = 0, address: str | None = None, backend: str = "onnxruntime",
                  device: str | None = None, threads: int | None = None, batch_size: int | None = None,
                  generator: str | None = None, conditioning: Mapping[str, np.ndarray] | None = None,
                  expect_digest: str | None = None, progress: bool = True,
                  on_shard: Callable[[dict[str, Any]], None] | None = None) -> RayRunReport:
    """Samples ``first_sample .. first_sample + num - 1`` of ``bundle`` with ``seed`` on Ray: ``out/shards/`` gets
    one .npy per ``shard_size`` samples and ``out/index.json`` the run's key and each shard's sha256. Rerunning
    resumes (verified shards are kept); a different bundle, seed, range, shard size or generator is refused.

    ``address``: a running cluster ("auto", "HOST:PORT", "ray://HOST:10001"); None starts a local one with
    ``workers * worker_cpus`` CPUs. ``workers`` actors with ``worker_cpus`` / ``worker_gpus`` each compute the
    shards; ``threads`` is each worker's intra-op thread count (default: ``worker_cpus``). ``on_shard(result)``
    sees every finished shard (after its file is written). Each shard is one batch unless ``batch_size`` is smaller,
    so the samples equal ``Sampler.sample(num, seed, first_sample=..., batch_size=shard_size)`` bit for bit (portable
    noise; not for a ``coupling = batch`` corrector).
    """
    bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(Path(bundle), expect_digest=expect_digest)
    m = bundle.manifest
    if m.sampler.task != "sample":
        raise InputError(f"{bundle.root} computes likelihoods (sampler.task {m.sampler.task!r}): use "
                         "likelihood_on_ray")
    generator = _portable(generator or m.noise.generator)
    if m.sampler.params.get("coupling") == "batch":
        raise InputError(f"{bundle.root}: its corrector couples the samples of a batch (coupling = batch), so shards "
                         "would not equal one process; export with --coupling per-sample to shard it")
    request = check_request(m, seed, first_sample, num, conditioning)
    seed, first_sample, num = request.seed, request.first_sample, request.num
    key = RunKey(bundle.digest, seed, first_sample, num, count(shard_size, "shard_size", 1, None), generator,
                 tuple(m.model.sample_shape))

    def call(actor, shard: Shard, shared: Mapping[str, Any]):
        lo = shard.first - first_sample
        sliced = {k: v if v.ndim == len(m.model.sample_shape) else v[lo:lo + shard.num]
                  for k, v in request.conditioning.items()}  # [*S] is shared; [num, *S] goes by shard
        return actor.sample.remote(shard.first, shard.num, int(seed), generator, sliced or None)

    return _run_shards(bundle, key, Path(out), call, {}, workers=workers, worker_cpus=worker_cpus,
                       worker_gpus=worker_gpus, address=address, backend=backend, device=device, threads=threads,
                       batch_size=batch_size, progress=progress, on_shard=on_shard, unit="samples")


def likelihood_on_ray(bundle: Bundle | str | os.PathLike, points: np.ndarray, seed: int, out: str | os.PathLike, *,
                      first_sample: int = 0, shard_size: int = 256, workers: int = 2, worker_cpus: float = 1,
                      worker_gpus: float = 0, address: str | None = None, backend: str = "onnxruntime",
                      device: str | None = None, threads: int | None = None, batch_size: int | None = None,
                      expect_digest: str | None = None, progress: bool = True,
                      on_shard: Callable[[dict[str, Any]], None] | None = None) -> RayRunReport:
    """log p (nats) of each row of ``points`` (float32 [N, *sample_shape], in the model's space; images
    dequantized first) under a likelihood ``bundle``, on Ray: row i is input ``first_sample + i``, its probes the
    noise of that sample index under ``seed``. ``out/shards/`` gets one float64 .npy per ``shard_size`` inputs and
    ``out/index.json`` the run's key (with the data's sha256) and each shard's sha256; :func:`load_samples` reads
    them. Rerunning resumes; other data, bundle, seed, range or shard size is refused. Workers integrate a shard in
    batches of ``batch_size`` (default: ``Sampler.log_likelihood``'s, 64 on the CPU), so with ``shard_size`` a
    multiple of it the values equal ``Sampler.log_likelihood(points, seed, first_sample=..., batch_size=...)`` bit
    for bit; the other arguments are :func:`sample_on_ray`'s."""
    bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(Path(bundle), expect_digest=expect_digest)
    m = bundle.manifest
    if m.sampler.task != "likelihood":
        raise InputError(f"{bundle.root} samples ({m.sampler.name}); likelihoods need a bundle exported with "
                         "--sampler likelihood")
    points = check_points(points, m)
    request = check_request(m, seed, first_sample, len(points), None)
    seed, first_sample = request.seed, request.first_sample
    key = RunKey(bundle.digest, seed, first_sample, request.num, count(shard_size, "shard_size", 1, None),
                 _portable(m.noise.generator), (), "float64", data_digest(points))

    def call(actor, shard: Shard, shared: Mapping[str, Any]):
        return actor.log_likelihood.remote(shard.first, shared["points"], shard.first - first_sample, shard.num,
                                           int(seed))

    return _run_shards(bundle, key, Path(out), call, {"points": points}, workers=workers, worker_cpus=worker_cpus,
                       worker_gpus=worker_gpus, address=address, backend=backend, device=device, threads=threads,
                       batch_size=batch_size, progress=progress, on_shard=on_shard, unit="inputs")


def _portable(generator: str) -> str:
    if generator == TORCH_ID:
        raise InputError("the 'torch' noise generator depends on the batch; sharded sampling needs the portable "
                         "philox generator")
    return generator


def _run_shards(bundle: Bundle, key: RunKey, run_dir: Path, call: Callable[[Any, Shard, Mapping[str, Any]], Any],
                shared: Mapping[str, Any], *, workers: int, worker_cpus: float, worker_gpus: float,
                address: str | None, backend: str, device: str | None, threads: int | None,
                batch_size: int | None, progress: bool, on_shard: Callable[[dict[str, Any]], None] | None,
                unit: str) -> RayRunReport:
    """The shards of ``key`` not yet in ``run_dir``, computed by ``workers`` :class:`ShardWorker` actors:
    ``call(actor, shard, refs)`` submits one (``refs``: ``shared``'s values put in Ray's object store once) and
    returns its object ref; the driver writes each result as it arrives, two shards in flight per worker. ``unit``
    names a shard's rows in the report ("samples", "inputs")."""
    try:
        import ray
    except ImportError:
        raise BackendUnavailable("--ray needs Ray: pip install 'vpsde[ray]' (make install has it)") from None

    workers = count(workers, "workers", 1, None)
    for name, value in (("worker_cpus", worker_cpus), ("worker_gpus", worker_gpus)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
            raise InputError(f"{name} must be a finite number >= 0, got {value!r}")
    if worker_cpus == 0 and worker_gpus == 0:
        raise InputError("worker_cpus and worker_gpus are both 0: a worker needs a CPU or a GPU")
    fresh = not os.path.lexists(run_dir / INDEX_NAME)
    index, todo = open_run(run_dir, key)
    try:
        return _compute_shards(bundle, key, run_dir, index, todo, call, shared, workers=workers,
                               worker_cpus=worker_cpus, worker_gpus=worker_gpus, address=address, backend=backend,
                               device=device, threads=threads, batch_size=batch_size, progress=progress,
                               on_shard=on_shard, unit=unit)
    except BaseException:
        if fresh and not index.done:  # nothing computed: no index or shard directory left behind
            discard_empty_run(run_dir)
        raise


def _compute_shards(bundle: Bundle, key: RunKey, run_dir: Path, index: Index, todo: list[Shard],
                    call: Callable[[Any, Shard, Mapping[str, Any]], Any], shared: Mapping[str, Any], *, workers: int,
                    worker_cpus: float, worker_gpus: float, address: str | None, backend: str, device: str | None,
                    threads: int | None, batch_size: int | None, progress: bool,
                    on_shard: Callable[[dict[str, Any]], None] | None, unit: str) -> RayRunReport:
    import ray

    reused = len(key.shards()) - len(todo)
    per_worker: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    torch_seen = False
    started = False
    if todo:
        if not ray.is_initialized():
            if address and address != "auto":
                check_reachable(address)
            sigterm = signal.getsignal(signal.SIGTERM)
            try:
                ray.init(address=address, num_cpus=None if address else max(1, int(workers * worker_cpus)),
                         num_gpus=None if address or not worker_gpus else int(np.ceil(workers * worker_gpus)),
                         include_dashboard=False, log_to_driver=False, configure_logging=False)
            except ConnectionError as e:  # Ray client: "ray client connection timeout"
                raise BackendUnavailable(f"--ray {address}: no Ray cluster answers there ({e})") from None
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, sigterm)  # ray.init installs its own (exit 15): the caller's again
            started = True
        try:
            actor = ray.remote(num_cpus=worker_cpus, num_gpus=worker_gpus, max_restarts=-1,
                               max_task_retries=-1)(ShardWorker)
            payload = ray.put(bundle_payload(bundle))
            refs = {name: ray.put(value) for name, value in shared.items()}
            pool = [actor.remote(payload, bundle.digest, backend, device, threads or max(1, int(worker_cpus)),
                                 batch_size) for _ in range(workers)]
            queue = list(todo)
            running: dict[Any, tuple[Shard, int]] = {}

            def submit(w: int) -> None:
                shard = queue.pop(0)
                running[call(pool[w], shard, refs)] = (shard, w)

            for w in range(len(pool)):
                for _ in range(2):  # two in flight per worker: the next shard is queued while one runs
                    if queue:
                        submit(w)
            with progress_bar(len(key.shards()), "shards", "shard", enabled=progress, initial=reused) as bar:
                while running:
                    (ref,), _ = ray.wait(list(running), num_returns=1)
                    shard, w = running.pop(ref)
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayTaskError as e:  # a worker raised: its message, not Ray's traceback
                        cause = getattr(e, "cause", None)
                        why = str(cause) if isinstance(cause, VpsdeError) else \
                            f"{type(cause).__name__}: {cause}" if cause is not None else str(e).splitlines()[0]
                        raise VpsdeError(f"shard {shard.first}..{shard.first + shard.num - 1} failed on a worker: "
                                         f"{why}") from None
                    index.done[shard.first] = write_shard(run_dir, shard, result.pop("values"), key.dtype)
                    index.write(run_dir)
                    who = f"{result['worker']}@{result['host']}"
                    per_worker[who][0] += shard.num
                    per_worker[who][1] += result["seconds"]
                    torch_seen = torch_seen or result["torch_imported"]
                    bar.update(1)
                    if on_shard is not None:
                        on_shard({**result, "file": str(run_dir / shard.file)})
                    if queue:
                        submit(w)
        except ray.exceptions.RayError as e:
            raise BackendUnavailable(f"Ray: {type(e).__name__}: {first_line(e, '')}") from None
        finally:
            if started:
                ray.shutdown()
    if not index.complete:
        raise VpsdeError(f"{run_dir}: shards are missing after the run; rerun the same command to finish it")
    return RayRunReport(run_dir, len(todo), reused, {k: (int(v[0]), v[1]) for k, v in per_worker.items()}, torch_seen,
                        unit)


RAY_CLIENT_PORT = 10001
"""Ray's client server port (ray://HOST without a port)."""


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """A Ray address "HOST:PORT" (the GCS) or "ray://HOST[:PORT]" (the client server, port 10001 by default) must
    accept a TCP connection within ``timeout`` seconds: ray.init retries an unreachable one for minutes."""
    scheme, sep, rest = address.rpartition("://")
    if sep and scheme != "ray":
        raise InputError(f"--ray {address}: expected HOST:PORT, ray://HOST:PORT or local")
    if sep and ":" not in rest:
        rest += f":{RAY_CLIENT_PORT}"
    host, _, port = (rest if sep else address).rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            pass
    except ValueError:
        raise InputError(f"--ray {address}: expected HOST:PORT, ray://HOST:PORT or local") from None
    except OSError as e:
        raise BackendUnavailable(f"--ray {address}: no Ray cluster answers there ({e.strerror or e}); start one with "
                                 "`ray start --head` or use --ray local") from None


def first_samples(run_dir: str | os.PathLike, count: int) -> np.ndarray:
    """The first ``count`` samples of a finished run (for the grid)."""
    samples = ShardedSamples(run_dir, verify=False)
    return samples[:min(count, len(samples))]
