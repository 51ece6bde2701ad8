"""The step scheduler of the working tree against the one of a git revision, and both against offline sampling
(``Sampler.sample``), in one process, in turn: a change to ``runtime/scheduler.py`` is measured side by side.

    .venv/bin/python bench/scheduler_ab.py --base HEAD~1 [--clients 1 16] [--repeats 8] [--bundle DIR] [--steps 50]

Per --clients level, closed-loop rounds: that many one-sample requests at once (seeds differ per round), the
scheduler ticked until idle; offline sampling runs the same requests one after the other (the per-request mode).
Each repeat runs the three in a rotated order (reversed every other repeat), so a slow spell of the machine hits
all three; printed: medians in ms per step per sample, offline / scheduler (above 1: the scheduler is faster) and
base / tree per repeat, and each scheduler's time per tick outside graph calls (wall time less the launches':
what the scheduler itself costs, less exposed to the machine's drift than the totals). One intra-op thread, ONNX
Runtime on the CPU. Both schedulers' last results (8 per level) are checked against offline sampling bit for bit
after the clock stops. Without --bundle it exports the shipped digits model with Euler-Maruyama at --steps steps.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from vpsde.runtime import Sampler
from vpsde.runtime.backends import open_backend
from vpsde.runtime.loop import OpenBackend
from vpsde.runtime.request import check_request
from vpsde.runtime.scheduler import StepScheduler

ROOT = Path(__file__).resolve().parent.parent
CHECKED = 8
"""Results per scheduler and level checked against offline sampling (the last ones)."""


def scheduler_at(rev: str, tmp: Path):
    """The StepScheduler class of ``runtime/scheduler.py`` at git revision ``rev``."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:runtime/scheduler.py"], check=True,
                            capture_output=True, text=True).stdout
    path = tmp / "scheduler_base.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("vpsde.runtime.scheduler_base", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module.StepScheduler


def offline(sampler: Sampler, clients: int, rounds: int, base_seed: int) -> float:
    """ms per step per sample: each round's requests one after the other."""
    t = time.perf_counter()
    for r in range(rounds):
        for c in range(clients):
            sampler.sample(1, seed=base_seed + r * 1000 + c)
    return 1e3 * (time.perf_counter() - t) / (rounds * clients * sampler.manifest.sampler.steps)


def timed_backend(bundle) -> tuple[OpenBackend, list[float]]:
    """ONNX Runtime on the CPU (one thread), every launch's seconds added to the returned list's one element."""
    opened = open_backend("onnxruntime", bundle, "cpu", 1)
    in_launch = [0.0]

    class Timed:
        def __init__(self, runner) -> None:
            self.runner = runner

        def bind(self, buffers):
            launch = self.runner.bind(buffers)

            def timed() -> None:
                t = time.perf_counter()
                launch()
                in_launch[0] += time.perf_counter() - t
            return timed

    return OpenBackend(opened.device, {key: Timed(r) for key, r in opened.runners.items()}), in_launch


def continuous(sched, in_launch: list[float], manifest, clients: int, rounds: int, base_seed: int,
               results: list, overhead: list) -> float:
    """ms per step per sample: each round's requests at once, ticked until idle. Appends to ``overhead`` the ms per
    tick spent outside graph calls."""
    t, launched, ticks = time.perf_counter(), in_launch[0], 0
    for r in range(rounds):
        jobs = [(sched.submit(check_request(manifest, base_seed + r * 1000 + c, 0, 1)), base_seed + r * 1000 + c)
                for c in range(clients)]
        while not sched.idle:
            sched.tick()
            ticks += 1
        results += [(job.result, seed) for job, seed in jobs]
    wall = time.perf_counter() - t
    overhead.append(1e3 * (wall - (in_launch[0] - launched)) / ticks)
    return 1e3 * wall / (rounds * clients * manifest.sampler.steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="HEAD", help="git revision whose runtime/scheduler.py is the baseline")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=8, help="rounds of requests per measurement")
    ap.add_argument("--bundle", type=Path, default=None)
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base_cls = scheduler_at(args.base, Path(tmp))
        if args.bundle is None:
            from vpsde.export import VPSDE, export_bundle, load_model

            args.bundle = export_bundle(load_model("digits", VPSDE()), Path(tmp) / "em", steps=args.steps,
                                        grid="uniform", log=lambda _: None).root
        sampler = Sampler(args.bundle, progress=False, threads=1)
        manifest = sampler.manifest
        scheds = {}
        for name, cls in (("base", base_cls), ("tree", StepScheduler)):
            backend, in_launch = timed_backend(sampler.bundle)
            scheds[name] = (cls(manifest, backend, slots=16), in_launch)
        print(f"bundle {args.bundle} ({manifest.sampler.name}, {manifest.sampler.steps} steps); base {args.base}; "
              f"1 thread; ms per step per sample, medians of {args.repeats}")
        for clients in args.clients:
            results: dict[str, list] = {"base": [], "tree": []}
            overhead: dict[str, list] = {"base": [], "tree": []}
            runs = {"offline": lambda seed: offline(sampler, clients, args.rounds, seed),
                    **{name: (lambda seed, name=name: continuous(*scheds[name], manifest, clients, args.rounds, seed,
                                                                 results[name], overhead[name])) for name in scheds}}
            for run in runs.values():  # warm-up: bindings of every batch shape
                run(10**6)
            times: dict[str, list[float]] = {name: [] for name in runs}
            names = list(runs)
            for rep in range(args.repeats):
                order = names[rep % 3:] + names[:rep % 3]
                for name in order[::-1] if rep % 2 else order:
                    times[name].append(runs[name](rep * 10**4))
            med = {name: float(np.median(v)) for name, v in times.items()}
            differ = {name: sum(not np.array_equal(x, sampler.sample(1, seed=seed)) for x, seed in res[-CHECKED:])
                      for name, res in results.items()}
            print(f"{clients:3d} clients: offline {med['offline']:.3f}, base {med['base']:.3f}, "
                  f"tree {med['tree']:.3f}; "
                  f"offline / base {med['offline'] / med['base']:.3f}, "
                  f"offline / tree {med['offline'] / med['tree']:.3f}, "
                  f"base / tree {med['base'] / med['tree']:.3f} (per repeat: "
                  + ", ".join(f"{b / t:.3f}" for b, t in zip(times['base'], times['tree'])) + ")"
                  + f"; outside graph calls: base {np.median(overhead['base'][1:]):.3f}, tree "
                  f"{np.median(overhead['tree'][1:]):.3f} ms per tick"
                  + "".join(f"; {n} {name} results differ from offline sampling" for name, n in differ.items() if n))


if __name__ == "__main__":
    main()
