"""Continuous batching of a bundle's program: rows of different requests, at different steps, share graph calls.

A request (seed, first_sample, num, conditioning) becomes ``num`` rows, one per sample index; a row of a sampling
program starts at its prior draw (noise call 0), a row of a likelihood program at its data point. Rows wait and join the
running set when a slot frees (at most ``slots`` rows run), a freed slot going to the waiting request with the fewest
rows running (on a tie, round robin: the one whose rows took a slot least recently), so one-sample requests are not
stuck behind large ones; each row walks the compiled program
(``runtime/program.py``) on its own: its x, its states, its step and its call within the step. One :meth:`tick`
makes one graph call over the rows whose next call is that graph (the graph of the row that joined first, so no
row waits forever; PC's corrector and predictor rows go in separate calls), feeding each row its own schedule
values (every schedule input is [batch], one value per row), its own noise (noise call ``noise_call(step,
offset)`` of its (seed, sample index), as offline) and its conditioning, padded up to the smallest of a fixed set of
batch shapes with copies of a real row whose outputs are dropped. A row leaves when its last call returns; a request
finishes when its last row does.

Each row's values equal offline sampling's (``Sampler.sample``, ``Sampler.log_likelihood``) bit for bit **if the
backend is row-invariant**: a row's output may not depend on its batch-mates, its position or the batch size.
:func:`probe_row_invariance` checks that on the backend as it opens (random rows, permuted, at every batch shape);
where it fails, callers serve each request as its own batch instead (``serving/triton_model.py``).
"""

from __future__ import annotations

import itertools
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from vpsde.runtime.errors import InputError, NonFiniteError, VpsdeError
from vpsde.runtime.likelihood import row_log_likelihood
from vpsde.runtime.loop import OpenBackend
from vpsde.runtime.manifest import Manifest
from vpsde.runtime.noise import PHILOX_ID, PhiloxNoise
from vpsde.runtime.program import Program
from vpsde.runtime.request import Request


class QueueFull(VpsdeError):
    """The scheduler holds ``max_queued`` requests already (one line, for the caller to send back)."""


@dataclass(eq=False)
class Job:
    """One request in the scheduler: its rows' results, filled as they finish: samples float32 [num, *sample_shape]
    (sampling), or log p(x) in nats float64 [num] (likelihood)."""

    request: Request
    result: np.ndarray
    remaining: int
    noise: PhiloxNoise
    error: VpsdeError | None = None
    cancelled: bool = False
    tag: Any = None
    last_admitted: int = -1  # when a row of it last took a slot (-1: never): the round-robin's tie-break

    @property
    def done(self) -> bool:
        return self.remaining == 0 or self.error is not None or self.cancelled


@dataclass(eq=False)
class _Row:
    job: Job
    index: int  # offset within the request: sample first_sample + index
    order: int  # when the row joined (its place in the FIFO)
    values: dict[str, np.ndarray]  # x (prior draw or data point) and each state at the start, float32 [*sample_shape]
    conditioning: dict[str, np.ndarray]
    step: int = 0
    call: int = 0  # index into Program.calls
    slot: int = -1  # its row in the scheduler's slot arrays while it runs
    noise: dict[int, np.ndarray] = field(default_factory=dict)  # noise call index -> float32 [*sample_shape], drawn ahead


@dataclass
class TickRecord:
    """What one tick ran: the graph, the real rows and the batch shape it was padded to."""

    graph: str
    rows: int
    shape: int
    steps: tuple[int, ...] = field(default_factory=tuple)


def batch_shapes(slots: int) -> tuple[int, ...]:
    """The default batch shapes for ``slots``: 1, 2, 4, ... and ``slots`` itself."""
    shapes = {slots}
    b = 1
    while b < slots:
        shapes.add(b)
        b *= 2
    return tuple(sorted(shapes))


class StepScheduler:
    """Continuous batching over one opened backend (module docstring).

    Args:
        manifest: the bundle's manifest (a sampling or likelihood task, the portable noise generator).
        backend: the opened graphs (``open_backend``): one runner per graph key and their device.
        slots: the most rows in flight (the largest batch shape by default).
        shapes: the batch shapes graph calls are padded to (default :func:`batch_shapes`); the largest bounds a call.
        max_queued: the most requests waiting or running; :meth:`submit` raises :class:`QueueFull` beyond it.
        nan_guard: check every call's outputs; a row with NaN/Inf fails its request (one line naming the step).
        prefetch_noise: draw the next calls' noise on a worker thread while the graph runs (the backend releases the
            GIL); otherwise in line. Either way each row draws :data:`NOISE_CHUNK` calls per pass.
    """

    def __init__(self, manifest: Manifest, backend: OpenBackend, slots: int = 16, shapes: tuple[int, ...] | None = None,
                 max_queued: int = 1024, nan_guard: bool = True, prefetch_noise: bool = True) -> None:
        if manifest.noise.generator != PHILOX_ID:
            raise InputError(f"noise.generator {manifest.noise.generator!r} depends on the batch; continuous batching "
                             f"needs the portable generator {PHILOX_ID!r}")
        self.manifest, self.program = manifest, Program.compile(manifest)
        self.runners, self.device = backend.runners, backend.device
        self.shapes = tuple(sorted(set(shapes or batch_shapes(slots))))
        if not self.shapes or self.shapes[0] < 1:
            raise InputError(f"batch shapes must be >= 1, got {self.shapes}")
        self.slots = max(slots, 1)
        self.max_queued, self.nan_guard = max_queued, nan_guard
        self.sample_shape = tuple(manifest.model.sample_shape)
        self.waiting: dict[Job, deque[_Row]] = {}  # per request, in submission order
        self.running: list[_Row] = []
        self.jobs: list[Job] = []
        self.last_tick: TickRecord | None = None
        self._order = itertools.count()
        self._admissions = itertools.count()
        self._bound: dict[tuple[str, int], _Binding] = {}
        self._last_noise_call = self.program.noise_call(self.program.steps, 0) - 1
        # every row's x, states and conditioning live in slot arrays [slots, *sample_shape]: a call gathers its rows
        # (padding repeats the last) with one take per input and scatters the rolled-over outputs back with one store
        specs = {spec.name: spec for graph in manifest.graphs.values() for spec in graph.inputs}
        carried = [*self.program.rolling, *{n for roles in self.program.roles.values()
                                           for n, role in roles.items() if role == "conditioning"}]
        self.slot_values = {name: np.zeros(specs[name].shape_for(self.slots), specs[name].dtype) for name in carried}
        self._free_slots = list(range(self.slots - 1, -1, -1))
        self._schedule32 = {name: values.astype(np.float32) for name, values in self.program.schedule.items()}
        self._shape_for = [next(s for s in self.shapes if s >= n) for n in range(self.shapes[-1] + 1)]  # rows -> shape
        self._noise_offsets = [dict(call.noise) for call in self.program.calls]
        self._rolled = {key: [(s.name, self.program.rolling_of_output[s.name]) for s in graph.outputs
                              if s.name in self.program.rolling_of_output] for key, graph in manifest.graphs.items()}
        self._noise_pool = ThreadPoolExecutor(1, thread_name_prefix="vpsde-noise") if prefetch_noise else None
        self._sampling = self.program.task == "sample"

    @classmethod
    def open(cls, bundle, backend: str = "onnxruntime", device: str | None = None, threads: int | None = None,
             slots: int = 16, shapes: tuple[int, ...] | None = None, **kw) -> tuple["StepScheduler", str | None]:
        """Open ``bundle`` (a :class:`~vpsde.runtime.Bundle` or its path) on ``backend`` and probe it: -> (the
        scheduler, None) where rows are invariant, else (the scheduler, the probe's one line): serve each request as
        its own batch then (``Sampler.sample``), or accept results that may differ from offline sampling by ulps."""
        from pathlib import Path

        from vpsde.runtime.backends import open_backend
        from vpsde.runtime.bundle import Bundle

        bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(Path(bundle))
        opened = open_backend(backend, bundle, device, threads)
        sched = cls(bundle.manifest, opened, slots, shapes, **kw)
        return sched, probe_row_invariance(bundle.manifest, opened, sched.shapes)

    # -- requests ---------------------------------------------------------------------------------------------------
    def submit(self, request: Request, tag: Any = None, data: np.ndarray | None = None) -> Job:
        """Queue a checked request (``runtime/request.py``); its rows join as slots free up. A likelihood program
        takes ``data``, the request's points checked as ``Sampler.log_likelihood`` checks them
        (``runtime/likelihood.py``'s ``check_points``), float32 [num, *sample_shape]."""
        likelihood = not self._sampling
        if likelihood != (data is not None):
            raise InputError("a likelihood program scores data points: pass data=[num, *sample_shape]" if likelihood
                             else f"a {self.program.task} program takes no data")
        if likelihood and (data.dtype != np.float32 or data.shape != (request.num, *self.sample_shape)):
            raise InputError(f"data: expected float32 {[request.num, *self.sample_shape]}, got {data.dtype} "
                             f"{list(data.shape)}")
        live = [j for j in self.jobs if not j.done]
        if len(live) >= self.max_queued:
            raise QueueFull(f"the scheduler holds {len(live)} requests (max_queued {self.max_queued}); retry later")
        noise = PhiloxNoise(request.seed)
        result = np.empty(request.num, np.float64) if likelihood else \
            np.empty((request.num, *self.sample_shape), np.float32)
        job = Job(request, result, request.num, noise, tag=tag)
        start = data if likelihood else noise(0, request.first_sample, request.num, self.sample_shape)
        cond = request.conditioning_for(request.first_sample, request.num, self.sample_shape)
        zeros = np.zeros(self.sample_shape, np.float32)
        for i in range(request.num):
            values = {name: zeros for name in self.program.rolling}
            values["x"] = start[i]
            self.waiting.setdefault(job, deque()).append(
                _Row(job, i, next(self._order), values, {k: v[i] for k, v in cond.items()}))
        self.jobs.append(job)
        return job

    def cancel(self, job: Job) -> None:
        """Drop ``job``'s rows (queued or running) at the next tick; its result stays unfilled."""
        job.cancelled = True

    @property
    def busy(self) -> int:
        """Rows in flight (at most ``slots``)."""
        return len(self.running)

    @property
    def queued(self) -> int:
        """Rows waiting for a slot."""
        return sum(len(rows) for rows in self.waiting.values())

    @property
    def idle(self) -> bool:
        return not self.running and not self.waiting

    # -- the loop ---------------------------------------------------------------------------------------------------
    def tick(self) -> list[Job]:
        """Admit waiting rows into free slots, make one graph call, roll its outputs over; return the requests that
        finished (or failed) in this tick."""
        self._drop_cancelled()
        self._admit()
        if not self.running:
            self.last_tick = None
            return []
        calls = self.program.calls
        graph = calls[self.running[0].call].graph  # the row that joined first leads
        rows = [r for r in self.running if calls[r.call].graph == graph][:self.shapes[-1]]
        shape = self._shape_for[len(rows)]
        self.last_tick = TickRecord(graph, len(rows), shape, tuple(sorted({r.step for r in rows})))
        outputs = self._call(graph, rows, shape)
        failed = self._check(graph, rows, outputs) if self.nan_guard else set()
        finished: list[Job] = []
        leaving: list[_Row] = []
        for k, row in enumerate(rows):
            if failed and row.job in failed:
                continue
            at = self._next_position(row)
            if at:
                row.step, row.call = at
            else:  # its last call: the sample (or the log-likelihood) is done
                final = outputs[self.program.final][k]
                row.job.result[row.index] = final if self._sampling else row_log_likelihood(final[None])[0]
                row.job.remaining -= 1
                if row.job.remaining == 0:
                    finished.append(row.job)
                leaving.append(row)
        if failed:
            leaving += [r for r in self.running if r.job in failed]
            finished += [j for j in failed if j not in finished]
        if leaving:
            gone = {id(r) for r in leaving}
            self._free_slots += [r.slot for r in leaving]
            self.running = [r for r in self.running if id(r) not in gone]
        if finished:
            self.jobs = [j for j in self.jobs if not j.done]
        return finished

    def run_until_idle(self, on_finish: Callable[[Job], None] = lambda job: None) -> None:
        """Tick until no row waits or runs, calling ``on_finish`` for each request as it finishes."""
        while not self.idle:
            for job in self.tick():
                on_finish(job)

    def close(self) -> None:
        """Stop the noise worker (the scheduler is not used afterwards)."""
        if self._noise_pool is not None:
            self._noise_pool.shutdown()

    # -- internals --------------------------------------------------------------------------------------------------
    def _admit(self) -> None:
        """Fill free slots: each from the waiting request with the fewest rows running; on a tie the one whose rows
        took a slot least recently (one never admitted first, then the oldest). A joining row's values go to its
        slot and its first noise is drawn."""
        if not self.waiting or len(self.running) >= self.slots:
            return
        running: dict[Job, int] = {}
        for r in self.running:
            running[r.job] = running.get(r.job, 0) + 1
        joined = []
        while self.waiting and len(self.running) < self.slots:
            # fewest rows running, then the longest since a row of it took a slot (never first; min keeps the oldest
            # of equals): round robin, so requests waiting behind as many others as there are slots still progress
            job = min(self.waiting, key=lambda j: (running.get(j, 0), j.last_admitted))
            job.last_admitted = next(self._admissions)
            row = self.waiting[job].popleft()
            if not self.waiting[job]:
                del self.waiting[job]
            row.slot = self._free_slots.pop()
            for name, value in (*row.values.items(), *row.conditioning.items()):
                self.slot_values[name][row.slot] = value
            self.running.append(row)
            joined.append((row, row.step, row.call))
            running[job] = running.get(job, 0) + 1
        self._store(self._draw_noise(joined))

    def _drop_cancelled(self) -> None:
        if any(j.cancelled for j in self.jobs):
            self.waiting = {j: rows for j, rows in self.waiting.items() if not j.cancelled}
            self._free_slots += [r.slot for r in self.running if r.job.cancelled]
            self.running = [r for r in self.running if not r.job.cancelled]
            self.jobs = [j for j in self.jobs if not j.cancelled]

    def _bind(self, graph: str, shape: int) -> "_Binding":
        key = (graph, shape)
        if key not in self._bound:
            spec = self.manifest.graphs[graph]
            buffers = {s.name: self.device.empty(s.shape_for(shape), s.dtype) for s in (*spec.inputs, *spec.outputs)}
            roles = self.program.roles[graph]
            inputs = [(s.name, roles[s.name], np.empty(s.shape_for(shape), s.dtype), buffers[s.name])
                      for s in spec.inputs]
            outputs = [(s.name, buffers[s.name]) for s in spec.outputs]
            self._bound[key] = _Binding(self.runners[graph].bind(buffers), inputs, outputs)
        return self._bound[key]

    def _call(self, graph: str, rows: list[_Row], shape: int) -> dict[str, np.ndarray]:
        """One call of ``graph`` on ``rows`` padded to ``shape``; rolls its outputs over into the rows' slots and
        returns host views of its outputs ([len(rows), ...], valid until the next call)."""
        bound = self._bind(graph, shape)
        n, pad = len(rows), shape - len(rows)
        slots = np.array([r.slot for r in rows] + [rows[-1].slot] * pad, np.intp)
        for name, role, staged, buffer in bound.inputs:
            if role == "schedule":
                np.take(self._schedule32[name], [r.step for r in rows] + [rows[-1].step] * pad, out=staged)
            elif role == "noise":
                for k, r in enumerate(rows):
                    staged[k] = r.noise.pop(self.program.noise_call(r.step, self._noise_offsets[r.call][name]))
                staged[n:] = staged[n - 1]
            else:  # x, a state or conditioning: in the slot arrays
                np.take(self.slot_values[name], slots, axis=0, out=staged)
            self.device.upload(buffer, staged)
        ahead = [(r, *at) for r in rows for at in [self._next_position(r)] if at and self._lacks_noise(r, *at)]
        if not ahead:
            bound.launch()
        elif self._noise_pool is None:
            bound.launch()
            self._store(self._draw_noise(ahead))
        else:
            drawing = self._noise_pool.submit(self._draw_noise, ahead)
            try:
                bound.launch()
            finally:
                self._store(drawing.result())
        outputs = {name: self.device.peek(buffer)[:n] for name, buffer in bound.outputs}
        for output, rolling in self._rolled[graph]:
            self.slot_values[rolling][slots[:n]] = outputs[output]
        return outputs

    def _next_position(self, row: _Row) -> tuple[int, int] | tuple[()]:
        """(step, call) of ``row``'s next graph call; () if this call is its last."""
        if row.call + 1 < len(self.program.calls):
            return row.step, row.call + 1
        return (row.step + 1, 0) if row.step + 1 < self.program.steps else ()

    def _lacks_noise(self, row: _Row, step: int, call: int) -> bool:
        return any(index not in row.noise for _, index in self.program.draws(self.program.calls[call], step))

    def _draw_noise(self, rows_at: list[tuple[_Row, int, int]]) -> list[tuple[_Row, dict[int, np.ndarray]]]:
        """The noise each row lacks for its call at (step, call): :data:`NOISE_CHUNK` consecutive noise calls of
        its (seed, sample index) per pass, the values of offline sampling's draws (the call index is a counter
        word of the portable generator). Reads rows only, so it may run on the worker thread."""
        drawn = []
        for row, step, call in rows_at:
            for _, index in self.program.draws(self.program.calls[call], step):
                if index not in row.noise:
                    k = min(NOISE_CHUNK, self._last_noise_call - index + 1)
                    chunk = row.job.noise.calls(index, k, row.job.request.first_sample + row.index, 1, self.sample_shape)
                    drawn.append((row, {index + j: chunk[j, 0] for j in range(k)}))
        return drawn

    @staticmethod
    def _store(drawn: list[tuple[_Row, dict[int, np.ndarray]]]) -> None:
        for row, values in drawn:
            row.noise.update(values)

    def _check(self, graph: str, rows: list[_Row], outputs: Mapping[str, np.ndarray]) -> set[Job]:
        failed: set[Job] = set()
        for name, arr in outputs.items():
            if np.isfinite(arr).all():
                continue
            bad = ~np.isfinite(arr.reshape(len(rows), -1)).all(axis=1)
            for k in np.nonzero(bad)[0]:
                row = rows[k]
                if row.job.error is None:
                    row.job.error = NonFiniteError(
                        f"graph {graph!r} produced NaN/Inf in output {name!r} at step {row.step} (of "
                        f"0..{self.program.steps - 1}) in {'sample' if self._sampling else 'input'} "
                        f"{row.job.request.first_sample + row.index}")
                failed.add(row.job)
        if failed:
            self.waiting = {j: rows for j, rows in self.waiting.items() if j not in failed}
        return failed


@dataclass
class _Binding:
    """One (graph, batch shape)'s bound launch, its inputs (name, role, host staging array, device buffer) and its
    outputs (name, device buffer)."""

    launch: Callable[[], None]
    inputs: list[tuple[str, str, np.ndarray, Any]]
    outputs: list[tuple[str, Any]]


NOISE_CHUNK = 16
"""Noise calls a row draws per pass (numpy's per-call cost paid once per chunk; 16 x 784 float32 = 50 kB per row)."""

PROBE_ELEMENTS = 1 << 16
"""The probe's budget: about this many sample elements in all (4096 rows of a 16-element model, 256 of 16 x 16)."""


def probe_row_invariance(manifest: Manifest, backend: OpenBackend, shapes: tuple[int, ...], seed: int = 0) -> str | None:
    """None if, for every graph, random rows (schedule values drawn from the bundle's own, every other input N(0, 1))
    computed one at a time equal the same rows computed in batches of each of ``shapes`` and of 3 and 64 (offline
    sampling's batches), at rotating positions; else one line saying where a row's bits changed. Evidence, not
    proof: a kernel that rounds one row in thousands by its position can slip through (the budget is
    :data:`PROBE_ELEMENTS`)."""
    program = Program.compile(manifest)
    rng = np.random.default_rng(seed)
    sample_shape = tuple(manifest.model.sample_shape)
    sizes = sorted({*shapes, 3, 64})
    rows = int(np.clip(PROBE_ELEMENTS // max(1, int(np.prod(sample_shape))), 2 * max(sizes), 4096))
    for key, spec in manifest.graphs.items():
        feed = {}
        for s in spec.inputs:
            if program.roles[key][s.name] == "schedule":
                feed[s.name] = rng.choice(program.schedule[s.name], rows).astype(np.float32)
            else:
                feed[s.name] = rng.standard_normal((rows, *sample_shape)).astype(np.float32)
        alone = [_infer(backend, manifest, key, {k: v[i:i + 1] for k, v in feed.items()}) for i in range(rows)]
        for size in sizes:
            order = np.roll(np.arange(rows), size // 2 + 1)  # other batch-mates and positions than a plain split
            for lo in range(0, rows - size + 1, size):
                pick = order[lo:lo + size]
                got = _infer(backend, manifest, key, {k: v[pick] for k, v in feed.items()})
                for name, arr in got.items():
                    want = np.concatenate([alone[i][name] for i in pick])
                    if not np.array_equal(arr, want):
                        return (f"graph {key!r} output {name!r}: a row's bits change with its batch-mates, position or "
                                f"the batch size (batch {size} vs 1, max |d| {np.abs(arr - want).max():.3g})")
    return None


def _infer(backend: OpenBackend, manifest: Manifest, key: str, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    from vpsde.runtime.loop import infer_once

    return infer_once(backend.runners[key], backend.device, manifest.graphs[key], key, feed)
