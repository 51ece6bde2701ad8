"""``vpsde bench``: ms/step, samples/s, loop overhead over bare graph calls, first-call and load time, peak RSS,
per backend and batch size (``runtime/benchmark.py``; the ``bench/`` scripts use the same code)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from vpsde.cli.common import (UsageError, add_expect_digest, backend_list, positive, prepare_out_file, report_not_run,
                              threads_arg)
from vpsde.runtime.errors import VpsdeError

EPILOG = """Each figure is the median of --iters loops of --steps steps (after --warmup untimed loops), each
followed by the same number of bare graph calls, so that load on the machine hits both alike. On the CPU the
bare calls are the loop's own (one trajectory's calls, inputs staged beforehand: a CPU call's time depends on
its data); on a GPU, the program's graphs on buffers bound once. samples/s
extrapolates ms/step to the bundle's full step count. A likelihood bundle scores seeded points (uniform in the
model's value range, or N(0, 1)) and reports inputs/s. On a GPU (--device cuda) every batch runs with CUDA
graphs off and on. Compare figures only within one run (ratios): on a shared machine absolute times drift.
A --backend that cannot open (not installed here, or refused by OpenVINO's open check) gets a line saying why,
under the others' rows, and the exit status is 1; with none that opens, 2.

examples:
  vpsde bench build/digits-em --batch 1,16,64
  vpsde bench build/digits-em --backend onnxruntime,tensorrt --device cuda --json out/bench.json
"""


def register(sub, fmt) -> None:
    p = sub.add_parser("bench", help="time a bundle's loop per backend and batch size",
                       description="Time the loop of a bundle (sampling or likelihood): ms/step, samples/s (inputs/s), "
                       "loop overhead over bare graph calls, time to first call and to open the backend, peak RSS.",
                       epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", type=Path, help="bundle directory")
    p.add_argument("--backend", default="onnxruntime", help="comma-separated backends (default: onnxruntime)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: each backend's)")
    p.add_argument("--batch", default="1,16,64", help="comma-separated batch sizes (default: 1,16,64)")
    p.add_argument("--steps", type=positive, default=50, help="steps timed per loop (default: 50, at most the bundle's)")
    p.add_argument("--warmup", type=int, default=1, help="untimed loops per batch size (default: 1)")
    p.add_argument("--iters", type=positive, default=5, help="timed loops per batch size (default: 5)")
    p.add_argument("--threads", type=threads_arg, default=None, help="intra-op CPU threads (default: the CPUs this process may use)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    p.add_argument("--plot", type=Path, default=None, metavar="FILE.png",
                   help="also draw ms/step and samples/s against the batch size, one line per backend (and CUDA "
                        "graphs on/off), with the bare graph calls dashed (needs matplotlib: vpsde[parity])")
    add_expect_digest(p)


def _batches(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s]
    except ValueError:
        raise UsageError(f"--batch: expected comma-separated sizes like 1,16,64, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise UsageError(f"--batch: sizes must be >= 1, got {text!r}")
    return sizes


def run(args: argparse.Namespace) -> int | None:
    from vpsde.runtime import Bundle, Sampler
    from vpsde.runtime.atomic import atomic_path
    from vpsde.runtime.benchmark import bench_sampler, format_table, rate_label

    if args.warmup < 0:
        raise UsageError(f"--warmup must be >= 0, got {args.warmup}")
    batches = _batches(args.batch)
    bundle = Bundle.load(args.bundle, expect_digest=args.expect_digest)
    rows, load_s, not_run = [], {}, {}
    backends = backend_list(args.backend, "--backend")
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path is not None:
            prepare_out_file(path, flag)
    for backend in backends:
        graph_modes = (False, True) if (args.device or "").startswith("cuda") or backend == "tensorrt" else (False,)
        for cuda_graph in graph_modes:
            t0 = time.perf_counter()
            try:
                sampler = Sampler(bundle, backend=backend, device=args.device, progress=False, threads=args.threads,
                                  cuda_graph=cuda_graph)
            except VpsdeError as e:  # not installed here, or refused by its open check: the others still run
                not_run[backend + (" with CUDA graphs" if cuda_graph else "")] = e
                break
            load_s.setdefault(backend, time.perf_counter() - t0)
            for batch in batches:
                rows.append(bench_sampler(sampler, backend, batch, args.steps, args.warmup, args.iters, cuda_graph))
            del sampler
    if not rows:  # no backend opened: the first one's error is the command's
        raise next(iter(not_run.values()))
    m = bundle.manifest
    rate = rate_label(m)
    print(f"{bundle.root}: {m.sampler.name}, {m.sampler.steps} steps, {m.model.name} {m.model.precision}, "
          f"{len(m.sampler.program)} graph kind(s) per step; median of {args.iters}")
    print(format_table(rows, load_s, rate))
    status = report_not_run(not_run)
    if args.json is not None:
        with atomic_path(args.json, suffix=".json") as tmp:
            tmp.write_text(json.dumps({"bundle": str(bundle.root), "digest": bundle.digest, "iters": args.iters,
                                       "load_s": load_s, "rows": [r.to_json() for r in rows],
                                       "not_run": {b: str(e) for b, e in not_run.items()}}, indent=1) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot is not None:
        from vpsde.runtime.benchmark import plot_rows

        plot_rows(rows, args.plot, f"{bundle.root.name}: {m.sampler.name}, {m.model.precision}", rate)
        print(f"wrote {args.plot}", file=sys.stderr)
    return status
