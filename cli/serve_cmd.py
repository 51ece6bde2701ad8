"""``vpsde triton | serve | request``: Triton model repositories, a local tritonserver, and its client."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from vpsde.cli.common import (UsageError, add_expect_digest, check_last_index, port_arg, positive, prepare_out_dir,
                               threads_arg, u64)
from vpsde.cli.conditioning import add_conditioning_args
from vpsde.runtime.errors import BackendUnavailable, VpsdeError


def register_triton(sub, fmt) -> None:
    """Add the subcommand triton to ``sub`` (argparse subparsers); ``fmt``: the help formatter."""
    p = sub.add_parser("triton", help="write a Triton Inference Server model repository serving a bundle",
                       formatter_class=fmt, description="Write REPO/NAME/config.pbtxt, REPO/NAME/1/model.py (Python "
                       "backend driving vpsde.runtime) and a digest-pinned copy of the bundle in REPO/NAME/1/bundle. "
                       "The Python that runs the model needs vpsde installed (pip install vpsde in the container).")
    p.add_argument("bundle", type=Path, help="bundle directory to serve")
    p.add_argument("--out", type=Path, required=True, help="repository directory to write")
    _triton_options(p)
    p.add_argument("--force", action="store_true", help="replace a repository vpsde wrote")


def register_serve(sub, fmt) -> None:
    """Add the subcommand serve to ``sub`` (argparse subparsers); ``fmt``: the help formatter."""
    from vpsde.serving.gate import DEFAULT_MAX_DEPTH
    from vpsde.serving.server import DEFAULT_MAX_REQUEST_MIB

    p = sub.add_parser("serve", help="serve a bundle on a local tritonserver (needs vpsde[serve])", formatter_class=fmt,
                       description="Write a model repository to a temporary directory, start tritonserver on it "
                       "(loopback unless --host), print the endpoints, and stop cleanly on Ctrl-C or SIGTERM.")
    p.add_argument("bundle", type=Path, nargs="?", help="the bundle to serve (or --repository)")
    p.add_argument("--repository", type=Path, default=None, help="serve this repository (from `vpsde triton`) as is")
    p.add_argument("--http-port", type=port_arg, default=8000, help="HTTP/REST port (1..65535)")
    p.add_argument("--grpc-port", type=port_arg, default=8001, help="gRPC port (1..65535, not the HTTP port)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--metrics-port", type=port_arg, default=None,
                   help="serve Triton's Prometheus metrics here (/metrics), among them the continuous-batching gauges "
                        "vpsde_rows_running, vpsde_rows_waiting and vpsde_slots (default: metrics off)")
    p.add_argument("--max-request-mib", type=positive, default=DEFAULT_MAX_REQUEST_MIB,
                   help="largest HTTP request body accepted, in MiB (larger bodies get 413, and JSON nested over "
                   f"{DEFAULT_MAX_DEPTH} deep gets 400, before they reach tritonserver)")
    p.add_argument("--tritonserver", default=None, help="the tritonserver binary (default: nvidia-pytriton's, or PATH)")
    _triton_options(p)


def register_request(sub, fmt) -> None:
    """Add the subcommand request to ``sub`` (argparse subparsers); ``fmt``: the help formatter."""
    p = sub.add_parser("request", help="ask a served vpsde model for samples (tritonclient, HTTP or gRPC)",
                       formatter_class=fmt, description="Write samples.npz (+ grid.png) like `vpsde sample` (with --data: "
                       "likelihood.json like `vpsde likelihood`), from a server started by `vpsde serve` or any Triton "
                       "serving a `vpsde triton` repository.")
    p.add_argument("url", help="HOST:PORT of the server's HTTP or gRPC endpoint (or http://HOST:PORT, "
                   "grpc://HOST:PORT: the scheme sets --protocol)")
    p.add_argument("--protocol", default="http", choices=["http", "grpc"],
                   help="the endpoint's protocol (tritonserver's HTTP port and gRPC port differ)")
    p.add_argument("--name", default="vpsde", help="model name")
    p.add_argument("--num", type=positive, default=16, help="number of samples")
    p.add_argument("--data", type=Path, default=None,
                   help="a likelihood model: score this data, as `vpsde likelihood --data` takes it (a float .npy of "
                        "points in the model's space, a uint8 .npy of images or a directory of PNGs, dequantized here "
                        "with --seed as `vpsde likelihood` does), and write OUT/likelihood.json (+ likelihood.png) "
                        "instead of samples")
    p.add_argument("--seed", type=u64("seed"), default=0, help="noise seed (of the samples, or of the probes and the images' dequantization)")
    p.add_argument("--first-sample", type=u64("index"), default=0,
                   help="global index of the first sample (or of the first data point)")
    p.add_argument("--value-range", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="data range for grid.png of image samples (default: the served bundle's)")
    p.add_argument("--out", type=Path, default=Path("out"), help="output directory")
    add_conditioning_args(p)


def _triton_options(p: argparse.ArgumentParser) -> None:
    from vpsde.runtime.backends import DEVICES
    from vpsde.serving.repository import BACKENDS as SERVED_BACKENDS

    add_expect_digest(p)
    p.add_argument("--name", default="vpsde", help="model name in the repository")
    p.add_argument("--backend", default="onnxruntime", choices=SERVED_BACKENDS,
                   help="what each model instance samples on (tensorrt: engines from `vpsde build` in the bundle)")
    p.add_argument("--device", default="cpu", choices=DEVICES, help="where each model instance runs")
    p.add_argument("--max-batch", type=positive, default=16,
                   help="requests Triton's dynamic batcher may hand the model in one call (each sampled on its own)")
    p.add_argument("--max-num", type=positive, default=1024, help="most samples one request may ask for (a likelihood model: most points one request may score)")
    p.add_argument("--instances", type=positive, default=1, help="model instances, each with its own Sampler")
    p.add_argument("--batching", default="continuous", choices=["continuous", "per-request"],
                   help="continuous: rows of all requests share graph calls step by step, requests joining and leaving "
                        "at step boundaries (a likelihood model: each point a row), responses bit-identical to offline "
                        "sampling and Sampler.log_likelihood (the 'torch' noise generator and backends failing the "
                        "row-invariance probe are served per request, with a log line); per-request: each request run "
                        "as its own batch")
    p.add_argument("--slots", type=positive, default=16, help="continuous batching: the most rows in flight")
    p.add_argument("--threads", type=threads_arg, default=1,
                   help="intra-op CPU threads per instance (scale with --instances)")


def _repository(args: argparse.Namespace, out: Path, force: bool) -> Path:
    from vpsde.runtime import Bundle
    from vpsde.serving.repository import write_repository

    bundle = Bundle.load(args.bundle, expect_digest=getattr(args, "expect_digest", None))
    try:
        return write_repository(bundle, out, name=args.name, backend=args.backend, device=args.device,
                                max_batch=args.max_batch, instances=args.instances, max_num=args.max_num,
                                threads=args.threads, batching=args.batching, slots=args.slots, force=force)
    except FileExistsError as e:
        raise UsageError(str(e)) from None


def cmd_triton(args: argparse.Namespace) -> None:
    repo = _repository(args, args.out, args.force)
    print(f"wrote {repo}: model {args.name!r} (config.pbtxt, 1/model.py, 1/bundle)")
    print(f"serve it: tritonserver --model-repository={repo.resolve()}  (the model's Python needs vpsde installed)")


SERVE_ENV_NAME = ".venv-serve"


def _hand_off_to_the_serving_env() -> None:
    """This Python cannot run tritonserver's Python backend (no nvidia-pytriton, or numpy 2, which the backend stub
    does not take): run the same command in the serving environment `make install` creates beside this one
    (.venv-serve), replacing this process. Returns if there is none."""
    import os

    exe = Path(sys.prefix).parent / SERVE_ENV_NAME / "bin" / "vpsde"
    if not exe.is_file() or Path(sys.prefix).name == SERVE_ENV_NAME:
        return
    print(f"vpsde serve: this environment cannot run Triton's Python backend; running {exe} instead",
          file=sys.stderr, flush=True)
    os.execv(str(exe), [str(exe), *sys.argv[1:]])


def cmd_serve(args: argparse.Namespace) -> None:
    import os
    import shutil

    from vpsde.serving.server import TritonServer, find_tritonserver, owned_temp_dir

    if (args.bundle is None) == (args.repository is None):
        raise UsageError("give a BUNDLE or --repository REPO (one of them)")
    flags = [("--http-port", args.http_port), ("--grpc-port", args.grpc_port), ("--metrics-port", args.metrics_port)]
    for i, (flag, port) in enumerate(flags):
        for other, port2 in flags[i + 1:]:
            if port is not None and port == port2:
                raise UsageError(f"{flag} and {other} are both {port}: give them different ports")
    try:
        install = find_tritonserver(args.tritonserver)
    except BackendUnavailable:
        if getattr(args, "argv_from_command_line", False):
            _hand_off_to_the_serving_env()  # returns only if there is none
        raise
    work, lock = owned_temp_dir("vpsde-serve")  # swept by the next `vpsde serve` if this one is killed
    try:
        # one level down: write_repository locks the repository's parent, and this process holds `work`'s lock
        (work / "repo").mkdir()
        repo = args.repository or _repository(args, work / "repo" / "repository", False)
        server = TritonServer(repo, install, args.http_port, args.grpc_port, host=args.host,
                              max_request_bytes=args.max_request_mib << 20, metrics_port=args.metrics_port)
        try:
            server.wait_ready()
            metrics = f"  metrics {server.metrics_url}" if server.metrics_url else ""
            print(f"serving {args.bundle or repo} as model {args.name!r}: HTTP {server.http_url}  gRPC {server.grpc_url}"
                  f"{metrics}  (Ctrl-C to stop)", flush=True)
            for line in server.notices():
                print(line, file=sys.stderr, flush=True)
            while server.process.poll() is None:
                time.sleep(0.5)
            raise VpsdeError(f"tritonserver stopped by itself (exit {server.process.returncode}): {server.errors()}")
        finally:
            code = server.stop()
            print(f"tritonserver stopped (exit {code})", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        os.close(lock)


def cmd_request(args: argparse.Namespace) -> None:
    import numpy as np

    from vpsde.runtime.images import image_grid, save_npz, save_png
    from vpsde.cli.conditioning import conditioning_for
    from vpsde.serving.client import request_samples, served_model, served_value_range

    if args.data is not None:
        return _request_log_likelihood(args)
    conditioning, served = None, None
    if args.known is not None or args.mask is not None:  # shaped and scaled as the served bundle says
        served, where = served_model(args.url, args.name, args.protocol), f"{args.protocol}://{args.url}/{args.name}"
        if served.sample_shape is None:
            raise UsageError(f"--known/--mask: {where} does not say its sample shape (not a vpsde model?)")
        shape = served.sample_shape
        conditioning = {k: v if v.ndim > len(shape) else np.broadcast_to(v, (args.num, *shape))  # one for all
                        for k, v in (conditioning_for(args, served.conditioning, shape, served.value_range, where, "model")
                                     or {}).items()}
    prepare_out_dir(args.out)
    t0 = time.perf_counter()
    samples = request_samples(args.url, args.seed, args.num, args.first_sample, model=args.name,
                              protocol=args.protocol, conditioning=conditioning)
    elapsed = time.perf_counter() - t0
    npz = args.out / "samples.npz"
    save_npz(npz, samples=samples, seed=np.uint64(args.seed), first_sample=np.uint64(args.first_sample),
             server=np.str_(f"{args.protocol}://{args.url}/{args.name}"))
    print(f"received {args.num} x {list(samples.shape[1:])} from {args.url} in {elapsed:.2f} s")
    print(f"wrote {npz}")
    value_range = args.value_range
    if value_range is None and samples.ndim == 4:  # the served config, read once
        value_range = served.value_range if served is not None else served_value_range(args.url, args.name, args.protocol)
    if value_range and samples.ndim == 4:
        png = args.out / "grid.png"
        save_png(png, image_grid(samples, tuple(value_range)))
        print(f"wrote {png}")


def _request_log_likelihood(args: argparse.Namespace) -> None:
    from vpsde.cli.likelihood_cmd import write_report
    from vpsde.runtime.likelihood import figures, load_data
    from vpsde.serving.client import request_log_likelihood, served_model

    served = served_model(args.url, args.name, args.protocol)
    where = f"{args.protocol}://{args.url}/{args.name}"
    if served.task != "likelihood" or served.sample_shape is None:
        raise UsageError(f"--data: {where} serves a {served.task or 'non-vpsde'} model, not a likelihood one "
                         "(vpsde serve a bundle from vpsde export --sampler likelihood)")
    data = load_data(args.data, served.sample_shape, served.value_range)
    check_last_index(args.first_sample, len(data), f"{len(data)} inputs")
    if data.is_image and served.noise_generator is None:
        raise UsageError(f"--data {args.data}: images are dequantized with the served bundle's noise generator, and "
                         f"{where} does not say which (a repository written before vpsde 0.5.6: write it again)")
    points = data.model_points(served.value_range, args.seed, args.first_sample, served.noise_generator)
    prepare_out_dir(args.out, "likelihood.json")
    t0 = time.perf_counter()
    logp = request_log_likelihood(args.url, points, args.seed, args.first_sample, model=args.name,
                                  protocol=args.protocol)
    elapsed = time.perf_counter() - t0
    report = {"server": where, "data": data.source, "seed": args.seed, "first_sample": args.first_sample,
              **figures(logp, data, served.value_range)}
    write_report(report, args.out, f"scored {len(data)} inputs on {args.url} in {elapsed:.2f} s")