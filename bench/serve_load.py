"""Bounded load test of `vpsde serve` (a real tritonserver on 127.0.0.1): continuous batching against one batch per
request, the same workloads on the same bundle, one server after the other.

    make bench-serve
    python bench/serve_load.py --serve-env .venv-serve --steps 50 --clients 1 4 16 64

One bundle (digits EM, --steps), one model instance with one intra-op thread per mode (`--batching continuous
--slots S` and `--batching per-request`). Closed-loop clients (each sends its next request when its last one
returns; odd clients over gRPC, even ones over HTTP), per workload and concurrency level: --requests-per-client
requests each, no new request after --max-seconds. Workloads: "one-sample" (every request 1 sample) and "mixed"
(half the requests 1 sample, the rest 2, 4, ..., 64 samples, drawn from a fixed seed). Prints samples/s, p50 and
p99 latency, the one-sample requests' p99, and continuous / per-request throughput. Up to 8 responses per cell are
checked against the in-process Sampler bit for bit after the clock stops. Only loopback traffic. Both servers are up
at once (an idle one costs no CPU) so that with --repeats the modes run in turn, cell by cell (ABBA...), and a slow
spell of the machine hits both; the table gives medians. First the ceiling: a bare graph call at batch 1 against
one at batch --slots, per row, measured before the servers start.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request_sizes(workload: str, clients: int, per_client: int) -> list[list[int]]:
    """Each client's request sizes: all 1 ("one-sample"), or half 1 and half 2^k, k uniform in 1..6 ("mixed")."""
    rng = np.random.default_rng(0)
    if workload == "one-sample":
        return [[1] * per_client for _ in range(clients)]
    return [[1 if rng.random() < 0.5 else 2 ** int(rng.integers(1, 7)) for _ in range(per_client)]
            for _ in range(clients)]


def run_cell(urls: dict[str, str], sizes: list[list[int]], max_seconds: float):
    """Closed-loop clients sending ``sizes[k]`` in turn -> (latencies s, sizes done, wall s, answers to check)."""
    from vpsde.serving.client import request_samples

    done: list[tuple[float, int]] = []
    answers: list = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + max_seconds

    def client(k: int) -> None:
        protocol = "grpc" if k % 2 else "http"
        try:
            for j, num in enumerate(sizes[k]):
                if time.perf_counter() > deadline:
                    return
                seed, first = 1000 * k + j, 7 * j
                t = time.perf_counter()
                x = request_samples(urls[protocol], seed, num, first, protocol=protocol)
                with lock:
                    done.append((time.perf_counter() - t, num))
                    if len(answers) < 8:
                        answers.append((seed, first, num, x))
        except BaseException as e:  # noqa: BLE001 - reported by the caller
            errors.append(e)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(len(sizes))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit(f"a request failed: {errors[0]}")
    lat, num = (np.array(v) for v in zip(*done))
    return lat, num, time.perf_counter() - t0, answers


def serve(env: Path, bundle: Path, mode: str, slots: int):
    http, grpc = free_port(), free_port()
    server = subprocess.Popen([str(env / "bin" / "vpsde"), "serve", str(bundle), "--http-port", str(http),
                               "--grpc-port", str(grpc), "--threads", "1", "--max-batch", "16", "--max-num", "64",
                               "--batching", mode, "--slots", str(slots)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if "serving" not in server.stdout.readline():
        raise SystemExit(f"vpsde serve failed: {server.stderr.read()[-2000:]}")
    return server, {"http": f"127.0.0.1:{http}", "grpc": f"127.0.0.1:{grpc}"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--serve-env", type=Path, default=Path(".venv-serve"))
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--workloads", nargs="+", default=["one-sample", "mixed"], choices=["one-sample", "mixed"])
    p.add_argument("--requests-per-client", type=int, default=3)
    p.add_argument("--max-seconds", type=float, default=60.0, help="no new request after this, per cell")
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--modes", nargs="+", default=["per-request", "continuous"], choices=["per-request", "continuous"])
    p.add_argument("--repeats", type=int, default=1,
                   help="run every cell this many times, the modes in turn (ABBA...), and report medians")
    args = p.parse_args()

    from continuous_batching import bare_call_ms

    from vpsde.export import VPSDE, export_bundle, load_model
    from vpsde.runtime import Sampler
    from vpsde.runtime.backends import open_backend
    from vpsde.serving.client import request_samples

    work = Path(tempfile.mkdtemp(prefix="vpsde-bench-serve-"))
    bundle = export_bundle(load_model("digits", VPSDE()), work / "bundle", steps=args.steps, grid="uniform",
                           log=lambda _: None)
    sampler = Sampler(bundle, progress=False, threads=1)
    print(f"machine: {os.cpu_count()} cores; digits EM {args.steps} steps; one model instance, one intra-op thread; "
          f"continuous: --slots {args.slots}; per-request: dynamic batching, each request its own batch; "
          f"{args.repeats} repeat(s), both servers up, the modes in turn")
    opened = open_backend("onnxruntime", sampler.bundle, "cpu", 1)
    one, full = bare_call_ms(opened, sampler.manifest, 1, 200), bare_call_ms(opened, sampler.manifest, args.slots, 50)
    print(f"bare graph call (no server running): batch 1 {one:.2f} ms, batch {args.slots} {full / args.slots:.2f} ms "
          f"per row: sharing calls can gain at most {one * args.slots / full:.2f}x", flush=True)
    servers, urls = [], {}
    runs: dict[tuple[str, int, str], list[tuple]] = {}
    try:
        for mode in args.modes:
            server, urls[mode] = serve(args.serve_env, bundle.root, mode, args.slots)
            servers.append(server)
            request_samples(urls[mode]["http"], 0, 1)  # warm-up
        for repeat in range(args.repeats):
            for workload in args.workloads:
                for clients in args.clients:
                    sizes = request_sizes(workload, clients, args.requests_per_client)
                    for mode in (args.modes if repeat % 2 == 0 else args.modes[::-1]):
                        lat, num, wall, answers = run_cell(urls[mode], sizes, args.max_seconds)
                        for seed, first, n, x in answers:
                            if not np.array_equal(x, sampler.sample(n, seed, first_sample=first)):
                                raise SystemExit(f"{mode}: the response for seed {seed} differs from offline sampling")
                        runs.setdefault((workload, clients, mode), []).append(
                            (len(lat), num.sum() / wall, np.percentile(lat, 50), np.percentile(lat, 99),
                             np.percentile(lat[num == 1], 99)))
                        print(f"  repeat {repeat + 1}: {mode} {workload} {clients} clients: {len(lat)} requests in "
                              f"{wall:.1f} s, {num.sum() / wall:.1f} samples/s", flush=True)
    finally:
        for server in servers:
            server.send_signal(signal.SIGTERM)
        for server in servers:
            server.wait(timeout=120)
    both = "per-request" in args.modes and "continuous" in args.modes
    print(f"medians over {args.repeats} repeat(s); the last column: continuous / per-request samples/s, the median of "
          f"the repeats' ratios (each repeat's ratios in brackets)")
    print("| workload | clients | mode | requests | samples/s | p50 s | p99 s | 1-sample p99 s | continuous / per-request |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for workload in args.workloads:
        for clients in args.clients:
            for mode in args.modes:
                cell = np.array(runs[workload, clients, mode])
                n, rate, p50, p99, small = np.median(cell, axis=0)
                ratio = ""
                if mode == "continuous" and both:
                    ratios = [c[1] / b[1] for c, b in zip(runs[workload, clients, "continuous"],
                                                           runs[workload, clients, "per-request"])]
                    ratio = f"{np.median(ratios):.2f}x" + (
                        f" ({', '.join(f'{r:.2f}' for r in ratios)})" if len(ratios) > 1 else "")
                print(f"| {workload} | {clients} | {mode} | {int(n)} | {rate:.1f} | {p50:.2f} | {p99:.2f} | {small:.2f} | "
                      f"{ratio} |")


if __name__ == "__main__":
    main()
