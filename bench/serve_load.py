"""Bounded load test of `vpsde serve` (a real tritonserver on 127.0.0.1) against the in-process Sampler.

    make bench-serve
    python bench/serve_load.py --serve-env .venv-serve --steps 50 --num 16 --clients 1 4 16

One bundle (digits EM, --steps), one request size (--num samples, i.e. the batch), one server instance with one
intra-op thread, against an in-process Sampler with one thread at the same batch. Per concurrency level: a fixed
number of requests (--requests-per-client x clients) or --max-seconds, whichever ends first, over HTTP; then
requests/s, samples/s, p50/p99 latency, and served samples/s / in-process samples/s. Only loopback traffic; the
server is stopped at the end. Every response is checked against the in-process samples.
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--serve-env", type=Path, default=Path(".venv-serve"))
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--num", type=int, default=16, help="samples per request")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests-per-client", type=int, default=3)
    p.add_argument("--max-seconds", type=float, default=90.0)
    args = p.parse_args()

    import numpy as np

    from vpsde.export import VPSDE, export_bundle, load_model
    from vpsde.runtime import Sampler
    from vpsde.serving.client import request_samples

    work = Path(tempfile.mkdtemp(prefix="vpsde-bench-serve-"))
    bundle = export_bundle(load_model("digits", VPSDE()), work / "bundle", steps=args.steps, grid="uniform",
                           log=lambda _: None)
    sampler = Sampler(bundle, progress=False, threads=1)
    sampler.sample(args.num, seed=0)  # warm-up
    t0 = time.perf_counter()
    reps = 3
    for r in range(reps):
        sampler.sample(args.num, seed=r)
    inproc = reps * args.num / (time.perf_counter() - t0)

    http = free_port()
    server = subprocess.Popen([str(args.serve_env / "bin" / "vpsde"), "serve", str(bundle.root), "--http-port", str(http),
                               "--grpc-port", str(free_port()), "--threads", "1", "--max-batch", "16",
                               "--max-num", str(max(args.num, 16))], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        if "serving" not in server.stdout.readline():
            raise SystemExit(f"vpsde serve failed: {server.stderr.read()[-2000:]}")
        url = f"127.0.0.1:{http}"
        request_samples(url, 0, args.num)  # warm-up
        print(f"machine: {os.cpu_count()} cores; digits EM {args.steps} steps, {args.num} samples per request; "
              f"server: 1 instance, 1 thread, dynamic batching (up to 16 requests per call, each its own batch); "
              f"in-process Sampler (1 thread, batch {args.num}): {inproc:.1f} samples/s")
        print("| clients | requests | requests/s | samples/s | p50 latency s | p99 latency s | served / in-process |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for clients in args.clients:
            latencies: list[float] = []
            checks: list = []
            deadline = time.perf_counter() + args.max_seconds
            lock = threading.Lock()

            def client(k: int) -> None:
                for j in range(args.requests_per_client):
                    if time.perf_counter() > deadline:
                        return
                    seed, first = 1000 * k + j, 7 * j
                    t = time.perf_counter()
                    x = request_samples(url, seed, args.num, first)
                    dt = time.perf_counter() - t
                    with lock:
                        latencies.append(dt)
                        if j == 0:
                            checks.append((seed, first, x))  # verified after the timed part

            threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            for seed, first, x in checks:
                if not np.array_equal(x, sampler.sample(args.num, seed, first_sample=first)):
                    raise SystemExit(f"the response for seed {seed} differs from the in-process samples")
            n = len(latencies)
            lat = np.sort(latencies)
            rate = n * args.num / wall
            print(f"| {clients} | {n} | {n / wall:.2f} | {rate:.1f} | {np.percentile(lat, 50):.2f} | "
                  f"{np.percentile(lat, 99):.2f} | {rate / inproc:.2f}x |")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)


if __name__ == "__main__":
    main()
