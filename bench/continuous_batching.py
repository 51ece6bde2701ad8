"""Continuous batching (runtime/scheduler.py) against one batch per request, side by side on one bundle, in process:
closed-loop clients (each sends its next request when the last one returns), one thread driving the backend, the
same ONNX Runtime sessions settings (one intra-op thread unless --threads). Prints samples/s and p50/p99 latency per
mode and workload, and checks every continuous response against offline sampling bit for bit (a likelihood
bundle: points scored per second, each response against Sampler.log_likelihood; a request's points are uniform in
[-1, 1], drawn from (client, round)).

    .venv/bin/python bench/continuous_batching.py [--bundle DIR] [--steps 50] [--requests 3] [--slots 16]
    .venv/bin/python bench/continuous_batching.py --likelihood [--steps 8]    # exports digits' likelihood (minutes)

First the ceiling: one bare graph call at batch 1 against one at batch --slots, per row. Workloads: one-sample
requests from 1, 4 and 16 clients; "mixed": 15 clients sending one-sample requests behind one
client sending 32-sample requests (the small requests' latency is what continuous batching should cut).
Without --bundle it exports the shipped digits model with Euler-Maruyama at --steps steps (--likelihood: its
likelihood program, Hutchinson divergence).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from vpsde.runtime import Sampler
from vpsde.runtime.backends import open_backend
from vpsde.runtime.request import check_request
from vpsde.runtime.scheduler import StepScheduler, batch_shapes, probe_row_invariance


def points(manifest, c: int, k: int, num: int) -> np.ndarray | None:
    """Client c's k-th request's data (a likelihood program), else None."""
    if manifest.sampler.task != "likelihood":
        return None
    return np.random.default_rng((c, k)).uniform(-1, 1, (num, *manifest.model.sample_shape)).astype(np.float32)


def offline(sampler: Sampler, c: int, k: int, num: int) -> np.ndarray:
    """Client c's k-th request run as its own batch: samples, or log p of its points."""
    data = points(sampler.manifest, c, k, num)
    if data is not None:
        return sampler.log_likelihood(data, c, first_sample=k * num)
    return sampler.sample(num, seed=c, first_sample=k * num)


def per_request(sampler: Sampler, sizes: list[int], rounds: int) -> tuple[list[float], list[int], float]:
    """One batch per request, first come first served; client c's k-th request is submitted when its previous one
    returns. -> (latencies s, request sizes, wall s)."""
    t0 = time.perf_counter()
    pending = [(t0, c, 0) for c in range(len(sizes))]  # (submitted, client, round), FIFO
    latencies, done_sizes = [], []
    while pending:
        submitted, c, k = pending.pop(0)
        offline(sampler, c, k, sizes[c])
        now = time.perf_counter()
        latencies.append(now - submitted)
        done_sizes.append(sizes[c])
        if k + 1 < rounds:
            pending.append((now, c, k + 1))
    return latencies, done_sizes, time.perf_counter() - t0


def continuous(sched: StepScheduler, manifest, sizes: list[int], rounds: int, check: Sampler):
    """The same clients on the scheduler; the responses are checked against offline sampling after the clock stops.
    -> (latencies s, request sizes, wall s, responses that differ)."""
    t0 = time.perf_counter()
    latencies, done_sizes, results = [], [], []
    for c in range(len(sizes)):
        sched.submit(check_request(manifest, c, 0, sizes[c]), tag=(t0, c, 0), data=points(manifest, c, 0, sizes[c]))
    while not sched.idle:
        for job in sched.tick():
            now = time.perf_counter()
            submitted, c, k = job.tag
            latencies.append(now - submitted)
            done_sizes.append(sizes[c])
            results.append((job.result, c, k))
            if k + 1 < rounds:
                sched.submit(check_request(manifest, c, (k + 1) * sizes[c], sizes[c]), tag=(now, c, k + 1),
                             data=points(manifest, c, k + 1, sizes[c]))
    wall = time.perf_counter() - t0
    mismatches = sum(not np.array_equal(r, offline(check, c, k, sizes[c])) for r, c, k in results)
    return latencies, done_sizes, wall, mismatches


def bare_call_ms(opened, manifest, batch: int, calls: int) -> float:
    """Median ms of one bound call of the bundle's first graph at ``batch`` (random inputs, buffers bound once)."""
    key, spec = next(iter(manifest.graphs.items()))
    rng = np.random.default_rng(0)
    buffers = {s.name: opened.device.empty(s.shape_for(batch), s.dtype) for s in (*spec.inputs, *spec.outputs)}
    for s in spec.inputs:
        opened.device.upload(buffers[s.name], rng.uniform(0.1, 0.9, s.shape_for(batch)).astype(np.float32))
    launch = opened.runners[key].bind(buffers)
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        launch()
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=None)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--requests", type=int, default=3, help="requests per client")
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--likelihood", action="store_true", help="without --bundle: export digits' likelihood program")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.bundle is None:
            from vpsde.export import VPSDE, export_bundle, load_model

            kind = {"sampler": "likelihood"} if args.likelihood else {"grid": "uniform"}
            print(f"exporting digits ({kind}, {args.steps} steps) ...", flush=True)
            args.bundle = export_bundle(load_model("digits", VPSDE()), Path(tmp) / "b", steps=args.steps,
                                        log=lambda _: None, **kind).root
        sampler = Sampler(args.bundle, progress=False, threads=args.threads)
        checker = Sampler(args.bundle, progress=False, threads=args.threads)
        opened = open_backend("onnxruntime", sampler.bundle, "cpu", args.threads)
        shapes = batch_shapes(args.slots)
        t0 = time.perf_counter()
        probe = probe_row_invariance(sampler.manifest, opened, shapes)
        print(f"bundle {args.bundle} ({sampler.manifest.sampler.name}, {sampler.manifest.sampler.steps} steps); "
              f"{args.threads} thread(s); slots {args.slots}, shapes {shapes}; row-invariance probe "
              f"{time.perf_counter() - t0:.1f} s: {probe or 'passed'}")
        one, full = bare_call_ms(opened, sampler.manifest, 1, 200), bare_call_ms(opened, sampler.manifest, args.slots, 50)
        print(f"bare graph call: batch 1 {one:.2f} ms, batch {args.slots} {full:.2f} ms = {full / args.slots:.2f} ms per "
              f"row: one-sample throughput can gain at most {one * args.slots / full:.2f}x by sharing calls")
        workloads = {"1 client x 1 sample": [1], "4 clients x 1 sample": [1] * 4, "16 clients x 1 sample": [1] * 16,
                     "mixed: 32 + 15 x 1": [32] + [1] * 15}
        unit = "points/s" if sampler.manifest.sampler.task == "likelihood" else "samples/s"
        print(f"{'workload':24s} {'mode':12s} {unit:>9s} {'p50 s':>7s} {'p99 s':>7s} {'small p99 s':>11s}", flush=True)
        for name, sizes in workloads.items():
            rows = {}
            for mode in ("per-request", "continuous"):
                if mode == "per-request":
                    lat, done, wall = per_request(sampler, sizes, args.requests)
                    bad = 0
                else:
                    sched = StepScheduler(sampler.manifest, opened, slots=args.slots, shapes=shapes)
                    lat, done, wall, bad = continuous(sched, sampler.manifest, sizes, args.requests, checker)
                lat, done = np.array(lat), np.array(done)
                small = lat[done == 1]
                rows[mode] = done.sum() / wall
                print(f"{name:24s} {mode:12s} {done.sum() / wall:9.1f} {np.percentile(lat, 50):7.2f} "
                      f"{np.percentile(lat, 99):7.2f} {np.percentile(small, 99) if len(small) else float('nan'):11.2f}"
                      + (f"   {bad} responses differ from offline sampling" if bad else ""), flush=True)
            print(f"{'':24s} {'ratio':12s} {rows['continuous'] / rows['per-request']:9.2f}x", flush=True)


if __name__ == "__main__":
    main()
