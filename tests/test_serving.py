"""Serving on Triton Inference Server, against a real `tritonserver` (nvidia-pytriton's binary) on 127.0.0.1.

The server and its Python backend run in the serving environment (.venv-serve, made by `make install`: numpy<2,
which the backend stub needs); this process is only a client, with tritonclient. Responses are compared bit for
bit with the in-process Sampler. Skipped with the reason when the serving environment is missing."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from conftest import small_conv
from vpsde.export import VPSDE, export_bundle, load_model
from vpsde.runtime import Sampler

pytest.importorskip("tritonclient.http", reason="tritonclient is not installed (pip install 'tritonclient[http,grpc]')")
from vpsde.serving.client import ServerError, request_samples  # noqa: E402

ROOT = Path(__file__).parent.parent
SERVE_ENV = Path(os.environ.get("VPSDE_SERVE_ENV", ROOT / ".venv-serve"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """`vpsde serve` from the serving environment, as a user runs it; stopped with SIGTERM."""

    def __init__(self, *args: str, tmpdir: Path | None = None, exe: Path = SERVE_ENV / "bin" / "vpsde") -> None:
        if not (SERVE_ENV / "bin" / "vpsde").is_file():
            pytest.skip(f"no serving environment at {SERVE_ENV} (make install creates it; VPSDE_SERVE_ENV=DIR)")
        self.http, self.grpc = _free_port(), _free_port()
        env = {**os.environ, **({"TMPDIR": str(tmpdir)} if tmpdir else {})}
        self.process = subprocess.Popen([str(exe), "serve", *args, "--http-port",
                                         str(self.http), "--grpc-port", str(self.grpc)],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        line = self.process.stdout.readline()  # "serving ... (Ctrl-C to stop)" once ready, or EOF on failure
        if "serving" not in line:
            self.process.wait(timeout=60)
            raise AssertionError(f"vpsde serve did not start: {line}{self.process.stderr.read()}")
        self.http_url, self.grpc_url = f"127.0.0.1:{self.http}", f"127.0.0.1:{self.grpc}"

    def children(self) -> list[int]:
        out = []
        for task in Path(f"/proc/{self.process.pid}/task").iterdir():
            out += [int(p) for p in (task / "children").read_text().split()]
        return out

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=120)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    return {"em": export_bundle(load_model("gmm:dim=3", VPSDE()), root / "em", steps=30, grid="uniform",
                                log=lambda _: None),
            "inpaint": export_bundle(load_model("gmm:dim=3", VPSDE()), root / "inpaint", sampler="inpaint", steps=20,
                                     log=lambda _: None)}


@pytest.fixture(scope="module")
def server(bundles):
    served = Served(str(bundles["em"].root), "--max-batch", "8", "--max-num", "64", "--instances", "1")
    yield served
    served.stop()


def test_responses_equal_in_process_samples(server, bundles):
    sampler = Sampler(bundles["em"], progress=False, threads=1)
    for protocol, url in (("http", server.http_url), ("grpc", server.grpc_url)):
        for seed, first, num in ((0, 0, 1), (7, 3, 3), (2**64 - 1, 2**40, 8), (12345, 2**32 - 1, 5)):
            got = request_samples(url, seed, num, first, protocol=protocol)
            np.testing.assert_array_equal(got, sampler.sample(num, seed, first_sample=first))


def test_concurrent_clients_are_batched_and_all_correct(server, bundles):
    """8 threads x 20 requests with their own seeds, offsets and sizes: every response is its own in-process sample
    set (none lost, none mixed up), and the dynamic batcher did hand the model several requests per execution
    (fewer executions than requests), each still sampled on its own."""
    import tritonclient.http as tc

    sampler = Sampler(bundles["em"], progress=False, threads=1)
    rng = np.random.default_rng(0)
    jobs = [(int(rng.integers(0, 2**63)), int(rng.integers(0, 2**40)), int(rng.integers(1, 9))) for _ in range(160)]
    results = _concurrently(8, len(jobs), lambda j: request_samples(
        server.http_url if j % 2 else server.grpc_url, jobs[j][0], jobs[j][2], jobs[j][1],
        protocol="grpc" if j % 2 == 0 else "http"))
    assert sorted(results) == list(range(len(jobs)))
    for j, (seed, first, num) in enumerate(jobs):
        np.testing.assert_array_equal(results[j], sampler.sample(num, seed, first_sample=first))
    stats = tc.InferenceServerClient(server.http_url).get_inference_statistics("vpsde")["model_stats"][0]
    assert stats["inference_count"] >= len(jobs) and stats["execution_count"] < stats["inference_count"], stats


def _concurrently(clients: int, jobs: int, ask) -> dict[int, np.ndarray]:
    """``ask(j)`` for j in 0..jobs-1 from ``clients`` threads (client k takes k, k + clients, ...): every answer, or
    the first errors raised."""
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def client(k: int) -> None:
        try:
            for j in range(k, jobs, clients):
                results[j] = ask(j)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors[:3]
    return results


def _raw_infer(url: str, inputs: list[dict]) -> tuple[int, str]:
    body = json.dumps({"inputs": inputs}).encode()
    req = urllib.request.Request(f"http://{url}/v2/models/vpsde/infer", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _triple(seed=1, first=0, num=2, seed_type="UINT64", batch=1):
    return [{"name": "seed", "shape": [batch, 1], "datatype": seed_type, "data": [seed] * batch},
            {"name": "first_sample", "shape": [batch, 1], "datatype": "UINT64", "data": [first] * batch},
            {"name": "num", "shape": [batch, 1], "datatype": "INT32", "data": [num] * batch}]


@pytest.mark.parametrize("flag", ["--http-port", "--grpc-port", "--metrics-port"])
def test_a_port_already_taken_is_one_line_before_tritonserver_starts(bundles, flag):
    """gRPC and metrics ports were found taken by tritonserver itself, after loading the models, and reported as a
    gRPC status dump; now each port is one line naming its flag, at once."""
    if not (SERVE_ENV / "bin" / "vpsde").is_file():
        pytest.skip(f"no serving environment at {SERVE_ENV} (make install creates it; VPSDE_SERVE_ENV=DIR)")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports = {"--http-port": _free_port(), "--grpc-port": _free_port(), flag: port}
        t0 = time.monotonic()
        r = subprocess.run([str(SERVE_ENV / "bin" / "vpsde"), "serve", str(bundles["em"].root),
                            *[str(a) for kv in ports.items() for a in kv]], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == \
        f"vpsde serve: error: {flag} {port}: cannot listen on 127.0.0.1:{port} (Address already in use)", r.stderr
    assert time.monotonic() - t0 < 30 and "tritonserver" not in r.stderr


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_request_to_an_address_where_nothing_listens_says_what_to_check(protocol):
    with pytest.raises(ServerError, match=r"Connection refused; nothing listens there: start the server \(vpsde serve\)"):
        request_samples(f"127.0.0.1:{_free_port()}", 0, 1, protocol=protocol, timeout=30)


@pytest.mark.parametrize("inputs, expect", [
    (_triple()[1:], "seed"),                                   # missing input: Triton's check
    (_triple(seed_type="INT64"), "seed"),                      # wrong dtype: Triton's check
    (_triple(batch=2), "one request per call"),                # two triples in one request: vpsde's
    (_triple(num=0), "vpsde: num must be in [1, 64]"),
    (_triple(num=65), "vpsde: num must be in [1, 64]"),
    (_triple(first=2**64 - 1, num=2), "vpsde: sample indices"),
])
def test_bad_requests_get_one_line_errors_and_the_server_keeps_serving(server, bundles, inputs, expect):
    status, body = _raw_infer(server.http_url, inputs)
    assert status == 400 and expect in json.loads(body)["error"], (status, body)
    got = request_samples(server.http_url, 3, 2, 0)
    np.testing.assert_array_equal(got, Sampler(bundles["em"], progress=False, threads=1).sample(2, 3))


def test_inpainting_takes_its_conditioning(bundles, tmp_path):
    served = Served(str(bundles["inpaint"].root), "--max-batch", "4")
    try:
        rng = np.random.default_rng(1)
        known = rng.uniform(-1, 1, (4, 3)).astype(np.float32)
        mask = np.broadcast_to(np.array([1, 0, 1], np.float32), (4, 3))
        got = request_samples(served.grpc_url, 5, 4, 2, protocol="grpc", conditioning={"known": known, "mask": mask})
        want = Sampler(bundles["inpaint"], progress=False, threads=1).sample(4, 5, first_sample=2,
                                                                  conditioning={"known": known, "mask": mask})
        np.testing.assert_array_equal(got, want)
        with pytest.raises(ServerError, match="mask"):
            request_samples(served.http_url, 5, 4, 2, conditioning={"known": known})
        # `vpsde request --known --mask` (it had neither): per-sample known data and one mask for all, as .npy,
        # shaped and checked by what the served model's config says
        np.save(tmp_path / "known.npy", known)
        np.save(tmp_path / "mask.npy", mask[0])
        for url in (served.http_url, f"grpc://{served.grpc_url}"):
            r = subprocess.run([sys.executable, "-m", "vpsde.cli.main", "request", url, "--num", "4", "--seed", "5",
                                "--first-sample", "2", "--known", str(tmp_path / "known.npy"), "--mask",
                                str(tmp_path / "mask.npy"), "--out", str(tmp_path / "out")],
                               capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, r.stderr
            with np.load(tmp_path / "out" / "samples.npz") as f:
                np.testing.assert_array_equal(f["samples"], want)
        r = subprocess.run([sys.executable, "-m", "vpsde.cli.main", "request", served.http_url, "--num", "4",
                            "--known", str(tmp_path / "known.npy"), "--out", str(tmp_path / "out2")],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and r.stderr.strip().endswith("is an inpainting model: pass --known and --mask"), r.stderr
    finally:
        served.stop()


def _metrics(url: str) -> dict[str, float]:
    """The vpsde_* gauges of a Triton /metrics page (Prometheus text), summed over instances."""
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("vpsde_"):
            name, value = line.split("{")[0], float(line.rsplit(" ", 1)[1])
            out[name] = out.get(name, 0.0) + value
    return out


@pytest.mark.parametrize("model,sampler", [("digits", "inpaint"), ("gmm", "em")])
def test_continuous_batching_serves_offline_samples(tmp_path, model, sampler):
    """The default --batching continuous: concurrent HTTP and gRPC requests of random seeds, offsets, sizes (and, for
    inpainting, random known pixels and masks) all equal Sampler.sample bit for bit, whether the backend passed the
    row-invariance probe (the digits UNet: rows of all requests share graph calls, the gauges show the scheduler) or
    not (the mixture: each request is its own batch, and `vpsde serve` says so)."""
    bundle = export_bundle(load_model(model, VPSDE()), tmp_path / "b", sampler=sampler, steps=6, grid="uniform",
                           log=lambda _: None)
    metrics_port = _free_port()
    served = Served(str(bundle.root), "--slots", "8", "--max-num", "16", "--metrics-port", str(metrics_port))
    try:
        sampler_ = Sampler(bundle, progress=False, threads=1)
        rng = np.random.default_rng()
        jobs = [(int(rng.integers(2**63)), int(rng.integers(2**40)), int(rng.integers(1, 6)),
                 ("http", "grpc")[j % 2]) for j in range(24)]
        conds = [_inpainting(bundle, num, rng) for _, _, num, _ in jobs]
        urls = {"http": served.http_url, "grpc": served.grpc_url}
        results = _concurrently(6, len(jobs), lambda j: request_samples(
            urls[jobs[j][3]], jobs[j][0], jobs[j][2], jobs[j][1], protocol=jobs[j][3], conditioning=conds[j]))
        for j, (seed, first, num, _) in enumerate(jobs):
            np.testing.assert_array_equal(results[j], sampler_.sample(num, seed, first_sample=first,
                                                                     conditioning=conds[j]))
        with pytest.raises(ServerError, match=r"num must be in \[1, 16\]"):
            request_samples(served.grpc_url, 0, 17, protocol="grpc", conditioning=_inpainting(bundle, 17, rng))
        gauges = _metrics(f"http://127.0.0.1:{metrics_port}/metrics")
    finally:
        assert served.stop() == 143  # SIGTERM, as every `vpsde serve`
    notices = served.process.stderr.read()
    if model == "digits":
        assert gauges == {"vpsde_rows_running": 0.0, "vpsde_rows_waiting": 0.0, "vpsde_slots": 8.0}
        assert "continuous batching off" not in notices
    else:  # ONNX Runtime rounds a mixture row by its batch-mates: served per request, never other bits
        assert gauges == {}
        assert "continuous batching off, each request runs as its own batch: graph" in notices


def _inpainting(bundle, num: int, rng) -> dict[str, np.ndarray] | None:
    """Random conditioning for an inpainting bundle (known pixels per sample, one mask per request), else None."""
    if not bundle.manifest.sampler.conditioning:
        return None
    shape = tuple(bundle.manifest.model.sample_shape)
    mask = (rng.random(shape) < 0.5).astype(np.float32)
    return {"known": rng.uniform(-1, 1, (num, *shape)).astype(np.float32), "mask": np.broadcast_to(mask, (num, *shape))}


def test_a_client_that_goes_away_frees_its_rows(tmp_path):
    """A gRPC client whose deadline passes mid-request: the server notices within a poll, drops the request's rows
    (the gauges fall to 0 long before its sampling would have ended) and keeps serving others bit for bit."""
    import tritonclient.grpc as grpcclient

    bundle = export_bundle(load_model("digits", VPSDE()), tmp_path / "b", steps=20, grid="uniform", log=lambda _: None)
    metrics_port = _free_port()
    served = Served(str(bundle.root), "--slots", "4", "--max-num", "4096", "--metrics-port", str(metrics_port))
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    try:
        client = grpcclient.InferenceServerClient(served.grpc_url)
        inputs = []
        for name, value, dtype in (("seed", np.array([[1]], np.uint64), "UINT64"),
                                   ("first_sample", np.array([[0]], np.uint64), "UINT64"),
                                   ("num", np.array([[4096]], np.int32), "INT32")):  # minutes at 4 slots
            inputs.append(grpcclient.InferInput(name, [1, 1], dtype))
            inputs[-1].set_data_from_numpy(value)
        answers: list = []
        client.async_infer("vpsde", inputs, lambda result, error: answers.append(error), client_timeout=3.0)
        t0 = time.monotonic()
        while (g := _metrics(url)).get("vpsde_rows_running") != 4:  # the request is in the scheduler
            assert time.monotonic() - t0 < 3, f"the request never ran: {g}"
            time.sleep(0.05)
        assert g["vpsde_rows_waiting"] > 0
        while not answers:
            time.sleep(0.1)
        assert "Deadline" in str(answers[0])
        client.close()
        t0 = time.monotonic()
        while (g := _metrics(url)).get("vpsde_rows_waiting", 1) + g.get("vpsde_rows_running", 1) > 0:
            assert time.monotonic() - t0 < 20, f"the cancelled request's rows still run: {g}"
            time.sleep(0.2)
        sampler = Sampler(bundle, progress=False, threads=1)
        np.testing.assert_array_equal(request_samples(served.http_url, 3, 2, 5), sampler.sample(2, 3, first_sample=5))
    finally:
        assert served.stop() == 143


@pytest.mark.parametrize("model", ["small-conv", "gmm"])
def test_a_likelihood_bundle_serves_log_likelihoods(tmp_path, model):
    """A likelihood bundle served as its own model: data in, logp out; concurrent HTTP and gRPC requests of random
    seeds, offsets and sizes equal Sampler.log_likelihood bit for bit, whether the backend passed the
    row-invariance probe (a small conv net: the points of all requests share graph calls, the gauges show the
    scheduler) or not (the mixture: each request is its own batch, and `vpsde serve` says so); a sampling request
    or bad data get one-line errors; `vpsde request --data` writes the report, for images (an image model: uint8
    .npy and PNGs, dequantized by the client) the same figures as `vpsde likelihood` on the bundle."""
    from vpsde.cli.main import main as cli
    from vpsde.serving.client import request_log_likelihood

    score = small_conv() if model == "small-conv" else load_model("gmm:dim=3", VPSDE())
    shape = tuple(score.sample_shape)
    images = model == "small-conv"
    bundle = export_bundle(score, tmp_path / "lik", sampler="likelihood", steps=6,
                           value_range=(-1, 1) if images else None, log=lambda _: None)
    metrics_port = _free_port()
    served = Served(str(bundle.root), "--max-num", "32", "--slots", "8", "--metrics-port", str(metrics_port))
    try:
        sampler = Sampler(bundle, progress=False, threads=1)
        rng = np.random.default_rng()
        jobs = [(int(rng.integers(2**63)), int(rng.integers(2**40)), rng.uniform(-1, 1, (int(rng.integers(1, 7)),
                 *shape)).astype(np.float32), ("http", "grpc")[j % 2]) for j in range(16)]
        jobs[0] = (0, 0, jobs[0][2][:1], "http")
        urls = {"http": served.http_url, "grpc": served.grpc_url}
        results = _concurrently(6, len(jobs), lambda j: request_log_likelihood(
            urls[jobs[j][3]], jobs[j][2], jobs[j][0], jobs[j][1], protocol=jobs[j][3]))
        for j, (seed, first, data, _) in enumerate(jobs):
            assert results[j].dtype == np.float64 and results[j].shape == (len(data),)
            np.testing.assert_array_equal(results[j], sampler.log_likelihood(data, seed, first_sample=first))
        with pytest.raises(ServerError, match="input 'data'.*NaN"):
            request_log_likelihood(served.http_url, np.full((2, *shape), np.nan, np.float32))
        with pytest.raises(ServerError, match=r"num must be in \[1, 32\]"):
            request_log_likelihood(served.grpc_url, np.zeros((33, *shape), np.float32), protocol="grpc")
        with pytest.raises(ServerError, match="unexpected inference output 'samples'"):  # Triton's own check
            request_samples(served.http_url, 0, 2)
        data = rng.uniform(-1, 1, (5, *shape)).astype(np.float32)
        np.save(tmp_path / "points.npy", data)
        assert cli(["request", served.http_url, "--data", str(tmp_path / "points.npy"), "--seed", "4",
                    "--out", str(tmp_path / "out")]) == 0
        report = json.loads((tmp_path / "out" / "likelihood.json").read_text())
        assert report["nll"] == (-sampler.log_likelihood(data, 4)).tolist() and report["inputs"] == 5
        pixels = rng.integers(0, 256, (3, *shape), dtype=np.uint8)
        np.save(tmp_path / "pixels.npy", pixels)
        if images:
            from PIL import Image

            (tmp_path / "pngs").mkdir()
            for i, image in enumerate(pixels):
                Image.fromarray(image[0]).save(tmp_path / "pngs" / f"{i}.png")
            seed, first = str(int(rng.integers(2**63))), str(int(rng.integers(2**40)))
            for source, url in (("pixels.npy", served.http_url), ("pngs", f"grpc://{served.grpc_url}")):
                common = ["--data", str(tmp_path / source), "--seed", seed, "--first-sample", first]
                assert cli(["request", url, *common, "--out", str(tmp_path / "served" / source)]) == 0
                assert cli(["likelihood", str(bundle.root), *common, "--out", str(tmp_path / "local" / source),
                            "--threads", "1", "--no-progress"]) == 0
                got, want = (json.loads((tmp_path / where / source / "likelihood.json").read_text())
                             for where in ("served", "local"))
                assert got["kind"] == "images (dequantized)" and got["bits_per_dim_offset"] == 7.0
                for key in ("inputs", "kind", "bits_per_dim_offset", "nll", "bpd", "mean_bpd"):
                    assert got[key] == want[key], key
        else:  # no value range: no way to dequantize, said before anything is sent
            assert cli(["request", served.http_url, "--data", str(tmp_path / "pixels.npy"),
                        "--out", str(tmp_path / "refused")]) == 2
            assert not (tmp_path / "refused").exists()
        gauges = _metrics(f"http://127.0.0.1:{metrics_port}/metrics")
    finally:
        assert served.stop() == 143
    notices = served.process.stderr.read()
    if model == "small-conv":
        assert gauges == {"vpsde_rows_running": 0.0, "vpsde_rows_waiting": 0.0, "vpsde_slots": 8.0}
        assert "continuous batching off" not in notices
    else:
        assert gauges == {}
        assert "continuous batching off, each request runs as its own batch: graph 'likelihood'" in notices


@pytest.mark.parametrize("edited", ["manifest.json", "config.pbtxt"])
def test_a_bad_bundle_fails_the_model_load_with_vpsdes_message(bundles, tmp_path, edited):
    """An edited bundle, or a config whose facts for clients (task, noise generator: `vpsde request --data`
    dequantizes with it) contradict the bundle, fails the model load with vpsde's line."""
    subprocess.run([str(SERVE_ENV / "bin" / "vpsde"), "triton", str(bundles["em"].root), "--out", str(tmp_path / "repo")],
                   check=True, capture_output=True)
    model = tmp_path / "repo" / "vpsde"
    if edited == "manifest.json":
        path, old, new = model / "1" / "bundle" / "manifest.json", '"steps": 30', '"steps": 31'
        said = "edited after export"
    else:
        path, old, new = model / "config.pbtxt", '"philox4x32-10/box-muller/v1"', '"torch"'
        said = "config.pbtxt parameter noise_generator 'torch' contradicts the bundle's"
    assert old in path.read_text()
    path.write_text(path.read_text().replace(old, new))
    r = subprocess.run([str(SERVE_ENV / "bin" / "vpsde"), "serve", "--repository", str(tmp_path / "repo"),
                        "--http-port", str(_free_port()), "--grpc-port", str(_free_port())],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and said in r.stderr, r.stderr[-2000:]


def _raw_http(url: str, request: bytes) -> tuple[int, str]:
    """One raw HTTP/1.1 exchange (no client library: some of these requests are malformed on purpose)."""
    host, port = url.split(":")
    with socket.create_connection((host, int(port)), timeout=120) as s:
        def send() -> None:
            try:
                s.sendall(request)
            except OSError:
                pass  # the gate may answer and stop reading before a refused body is all sent

        sender = threading.Thread(target=send)
        sender.start()
        data = b""
        while chunk := s.recv(1 << 16):
            data += chunk
        sender.join()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode(errors="replace")


def _post(body: bytes, extra: bytes = b"") -> bytes:
    return (b"POST /v2/models/vpsde/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + extra +
            b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)


@pytest.mark.parametrize("request_bytes, status, expect", [
    # five million '[' made nvidia-pytriton's tritonserver segfault (0.4.2 and before)
    (_post(b"[" * 5_000_000), 400, "nests 5000000 deep"),
    (_post(b'{"inputs": ' + b"[" * 40 + b"]" * 40 + b"}"), 400, "nests 41 deep"),
    (_post(b"0" * ((64 << 20) + 1)), 413, "at most 67108864"),
    (b"POST /v2/models/vpsde/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n[[[[[\r\n0\r\n\r\n",
     411, "Content-Length"),
    (b"GET / HTTP/1.1\r\n" + b"X: " + b"a" * 70000 + b"\r\n\r\n", 431, "request head over"),
])
def test_hostile_http_requests_are_refused_in_front_of_the_server_and_it_keeps_serving(server, bundles, request_bytes,
                                                                                      status, expect):
    code, body = _raw_http(server.http_url, request_bytes)
    assert code == status and expect in json.loads(body)["error"], (code, body[:300])
    assert server.process.poll() is None
    got = request_samples(server.http_url, 3, 2, 0)
    np.testing.assert_array_equal(got, Sampler(bundles["em"], progress=False, threads=1).sample(2, 3))


def test_the_gate_relays_keep_alive_and_100_continue(server, bundles):
    """Requests on one connection, as a client library's pooled connection sends them: a refused one (400 Bad
    Request from tritonserver) and one for a model that is not there (404 Not Found), then two samples requests (the
    second with Expect: 100-continue, as curl sends for large bodies), all answered through the gate. Before 0.5.12
    a reason phrase with a space made the gate wait for tritonserver to close the connection, so the next request
    on it hung."""

    def post(path: str, inputs: list, extra: bytes = b"") -> bytes:
        body = json.dumps({"inputs": inputs}).encode()
        return (b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n" + extra + b"Content-Length: " +
                str(len(body)).encode() + b"\r\n\r\n" + body)

    def response(f) -> tuple[bytes, bytes]:
        status = f.readline()
        length = 0
        while (line := f.readline()) != b"\r\n":
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        return status, f.read(length)

    want = Sampler(bundles["em"], progress=False, threads=1).sample(2, 3)
    host, port = server.http_url.split(":")
    with socket.create_connection((host, int(port)), timeout=60) as s:
        f = s.makefile("rb")
        s.sendall(post("/v2/models/vpsde/infer", _triple(num=65)))
        status, body = response(f)
        assert status.startswith(b"HTTP/1.1 400 ") and b"num must be in [1, 64]" in body, (status, body)
        s.sendall(post("/v2/models/nothing-here/infer", _triple()))
        status, body = response(f)
        assert status.startswith(b"HTTP/1.1 4") and b"nothing-here" in body, (status, body)
        for extra in (b"", b"Expect: 100-continue\r\n"):
            s.sendall(post("/v2/models/vpsde/infer", _triple(seed=3, num=2), extra))
            if extra:
                assert b"100" in f.readline()
                f.readline()
            status, body = response(f)
            assert b" 200 " in status, status
            out = json.loads(body)["outputs"][0]
            np.testing.assert_array_equal(np.asarray(out["data"], np.float32).reshape(want.shape), want)


def test_sigterm_stops_the_server_and_leaves_no_process(bundles, tmp_path):
    """SIGTERM with clients still connected (a keep-alive HTTP connection and a gRPC channel, idle, as pooled
    clients leave them): tritonserver waits for every open HTTP connection before it exits, so before 0.5.12 it was
    killed after its 30 s exit timeout; now the gate closes idle connections first and the server exits cleanly."""
    import tritonclient.grpc as grpcclient

    served = Served(str(bundles["em"].root), tmpdir=tmp_path)
    children = served.children()
    assert children, "vpsde serve has no tritonserver child"
    host, port = served.http_url.split(":")
    idle_http = socket.create_connection((host, int(port)), timeout=60)
    body = json.dumps({"inputs": _triple(seed=3, num=2)}).encode()
    idle_http.sendall(b"POST /v2/models/vpsde/infer HTTP/1.1\r\nHost: x\r\nContent-Length: " + str(len(body)).encode()
                      + b"\r\n\r\n" + body)
    assert idle_http.recv(1 << 16).startswith(b"HTTP/1.1 200 ")
    idle_grpc = grpcclient.InferenceServerClient(served.grpc_url)
    assert idle_grpc.is_server_ready()
    t0 = time.monotonic()
    assert served.stop() == 143
    assert time.monotonic() - t0 < 20
    assert "tritonserver stopped (exit 0)" in served.process.stderr.read()
    idle_http.close()
    for pid in children:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    assert list(tmp_path.iterdir()) == []  # no repository, backend copy or tritonserver.log left behind


def _alive(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def test_sigkill_takes_the_server_down_and_the_next_serve_sweeps_its_files(bundles, tmp_path):
    """tritonserver runs in its own session; before 0.4.2 a SIGKILLed `vpsde serve` left it serving, and its
    temporary repository behind. Now it gets SIGTERM when its parent dies, and the next serve sweeps the files."""
    served = Served(str(bundles["em"].root), tmpdir=tmp_path)
    children = served.children()
    assert children and list(tmp_path.iterdir())
    served.process.kill()
    served.process.wait(timeout=30)
    deadline = time.monotonic() + 90  # Triton drains and unloads on SIGTERM (--exit-timeout-secs=30)
    while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(_alive(pid) for pid in children), "tritonserver outlived a SIGKILLed vpsde serve"
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left  # what the killed process could not remove ...
    again = Served(str(bundles["em"].root), tmpdir=tmp_path)
    try:
        assert not any((tmp_path / name).exists() for name in left)  # ... the next serve removed
    finally:
        assert again.stop() == 143


@pytest.mark.parametrize("ports, message", [(["--http-port", "70000"], "expected a port in 1..65535"),
                                             (["--http-port", "9100", "--grpc-port", "9100"], "both 9100"),
                                             (["--grpc-port", "9101", "--metrics-port", "9101"],
                                              "--grpc-port and --metrics-port are both 9101")])
def test_ports_are_checked(bundles, ports, message):
    if not (SERVE_ENV / "bin" / "vpsde").is_file():
        pytest.skip(f"no serving environment at {SERVE_ENV}")
    r = subprocess.run([str(SERVE_ENV / "bin" / "vpsde"), "serve", str(bundles["em"].root), *ports],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and message in r.stderr, r.stderr[-1000:]


def test_serve_from_the_export_environment_runs_in_the_serving_one(bundles):
    """`vpsde serve` from .venv (numpy 2, no nvidia-pytriton) told the user to pip install vpsde[serve] there, which
    would pull numpy<2 into it; it now re-runs the same command in .venv-serve beside it, and says so."""
    import sys

    here = Path(sys.executable).parent / "vpsde"
    if Path(sys.prefix).parent / ".venv-serve" != SERVE_ENV or not here.is_file():
        pytest.skip("this Python is not the .venv beside .venv-serve")
    served = Served(str(bundles["em"].root), exe=here)
    try:
        got = request_samples(served.http_url, 4, 3, 0)
        np.testing.assert_array_equal(got, Sampler(bundles["em"], progress=False).sample(3, 4))
    finally:
        assert served.stop() == 143
    assert ".venv-serve/bin/vpsde instead" in served.process.stderr.read()


def test_request_draws_the_grid_in_the_served_range_and_a_wrong_port_is_one_line(tmp_path):
    """`vpsde request` wrote grid.png only with --value-range (the served bundle knows its range); asking the gRPC
    port over HTTP ended in geventhttpclient's HTTPParseError traceback."""
    import sys

    unet = load_model("unet-random:seed=3,channels=8", VPSDE())
    bundle = export_bundle(unet, tmp_path / "img", steps=6, grid="uniform", value_range=(-1, 1), log=lambda _: None)
    served = Served(str(bundle.root))
    try:
        cli = [sys.executable, "-m", "vpsde.cli.main", "request"]
        r = subprocess.run([*cli, f"http://{served.http_url}", "--num", "4", "--out", str(tmp_path / "o")],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and (tmp_path / "o" / "grid.png").is_file(), r.stderr
        r = subprocess.run([*cli, served.grpc_url, "--protocol", "http", "--num", "1", "--out", str(tmp_path / "p")],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "port" in r.stderr
        np.save(tmp_path / "pixels.npy", np.full((2, 3, 32, 32), 7, np.uint8))
        r = subprocess.run([*cli, served.grpc_url, "--protocol", "grpc", "--data", str(tmp_path / "pixels.npy"),
                            "--out", str(tmp_path / "q")], capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "serves a sample model, not a likelihood one" in r.stderr and not (tmp_path / "q").exists()
    finally:
        assert served.stop() == 143


