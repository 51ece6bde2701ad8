"""The Triton Python-backend model behind ``vpsde triton`` repositories.

Each model instance loads the repository's copy of the bundle (checked against the digest in config.pbtxt, so a
changed bundle fails the model load with vpsde's message) and holds one Sampler. Triton's dynamic batcher hands
``execute`` several requests at once (one call, less scheduling); each request is then sampled on its own, as one
batch of its ``num`` samples, so its response equals ``Sampler.sample(num, seed, first_sample=...)`` in-process
bit for bit whatever it arrived with. Requests are not fused into shared graph batches: ONNX Runtime's kernels can
round a row differently depending on the batch it sits in (measured: fused requests moved 2 of 12 values by one
float32 ulp, 5.96e-8). A bad request gets Triton's error with vpsde's one-line message and the instance keeps
serving.

With ``batching`` "continuous" (the default) a bundle is served by the step scheduler instead
(``runtime/scheduler.py`` on a thread, ``serving/continuous.py``): ``execute`` hands each request over and returns;
the request's one response goes through its response sender when its last row finishes, so rows of all requests
share graph calls step by step and responses are still bit-identical to offline sampling (and to
``Sampler.log_likelihood``). Served per request instead, with one log line saying why: the batch-dependent 'torch'
noise generator, and backends that fail the row-invariance probe as the model loads (the mixture's graphs do).
The scheduler's rows in flight and waiting are Triton gauges (``vpsde_rows_running``, ``vpsde_rows_waiting``,
``vpsde_slots``) on the metrics port when the server has one (``vpsde serve --metrics-port``).

A likelihood bundle (``sampler.task`` "likelihood") has its own request type: ``seed``, ``first_sample`` and
``data`` (float32 [1, N, *sample_shape], points in the model's space) in, ``logp`` (float64 [1, N], nats) out, equal
to ``Sampler.log_likelihood(data, seed, first_sample=...)`` in-process bit for bit, each point a row of the
scheduler as a sample is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from vpsde.runtime.errors import InputError, VpsdeError
from vpsde.runtime.request import Request, check_request


class RequestError(VpsdeError):
    """A request that does not fit the contract (one line, sent back as Triton's error)."""


def parse_request(get, manifest, max_num: int) -> Request:
    """One request's transport layout checked here (``get(name)`` returns an input as numpy or None; Triton has
    already checked names, dtypes and ranks against config.pbtxt): seed, first_sample and num as [1, 1], each
    conditioning input as [1, 1 or num, *sample_shape]. What they mean is checked by the request gate
    (``runtime/request.py``), as for every other surface."""
    values = _scalars(get, (("seed", np.uint64), ("first_sample", np.uint64), ("num", np.int32)))
    conditioning = list(manifest.sampler.conditioning)
    sample_shape = tuple(manifest.model.sample_shape)
    cond = {}
    for name in conditioning:
        arr = get(name)
        if arr is None:
            raise RequestError(f"input {name!r} is missing: this bundle takes conditioning inputs {conditioning}")
        if arr.ndim != len(sample_shape) + 2 or arr.shape[0] != 1 or tuple(arr.shape[2:]) != sample_shape:
            raise RequestError(f"input {name!r}: expected shape [1, 1 or num, {', '.join(map(str, sample_shape))}], "
                               f"got {list(arr.shape)}")
        cond[name] = arr[0, 0] if arr.shape[1] == 1 else arr[0]
    try:
        return check_request(manifest, values["seed"], values["first_sample"], values["num"], cond, max_num=max_num)
    except InputError as e:
        raise RequestError(str(e)) from None


def parse_likelihood_request(get, manifest, max_num: int) -> tuple[Request, np.ndarray]:
    """A likelihood request (seed and first_sample [1, 1], data [1, N, *sample_shape] float32) checked by the same
    gates as ``Sampler.log_likelihood``: -> (the request with num = N, the points [N, *sample_shape])."""
    from vpsde.runtime.likelihood import check_points

    values = _scalars(get, (("seed", np.uint64), ("first_sample", np.uint64)))
    data = get("data")
    if data is None:
        raise RequestError("input 'data' is missing: a likelihood model takes the points to score")
    sample_shape = tuple(manifest.model.sample_shape)
    if data.ndim != len(sample_shape) + 2 or data.shape[0] != 1:
        raise RequestError(f"input 'data': expected shape [1, N, {', '.join(map(str, sample_shape))}] (one request "
                           f"per call), got {list(data.shape)}")
    try:
        points = check_points(np.ascontiguousarray(data[0]), manifest, "input 'data'")
        request = check_request(manifest, values["seed"], values["first_sample"], len(points), None, max_num=max_num)
    except InputError as e:
        raise RequestError(str(e)) from None
    return request, points


def _scalars(get, names) -> dict[str, int]:
    values = {}
    for name, dtype in names:
        arr = get(name)
        if arr is None:
            raise RequestError(f"input {name!r} is missing")
        if arr.dtype != dtype or arr.shape != (1, 1):
            raise RequestError(f"input {name!r}: expected {np.dtype(dtype).name} of shape [1, 1] (one request per "
                               f"call), got {arr.dtype} {list(arr.shape)}")
        values[name] = int(arr[0, 0])
    return values


class TritonPythonModel:
    """Triton's Python-backend interface: ``initialize``, ``execute``, ``finalize``."""

    def initialize(self, args: dict[str, Any]) -> None:
        from vpsde.runtime import Bundle, Sampler

        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        root = Path(args["model_repository"]) / args["model_version"] / "bundle"
        try:
            self.bundle = Bundle.load(root, expect_digest=params["bundle_digest"])
            m = self.bundle.manifest
            for key, fact in (("task", m.sampler.task), ("noise_generator", m.noise.generator)):  # clients read them
                if params.get(key, fact) != fact:
                    raise InputError(f"config.pbtxt parameter {key} {params[key]!r} contradicts the bundle's {fact!r}")
            threads = int(params.get("threads", "0")) or None
            self.sampler = Sampler(self.bundle, backend=params.get("backend", "onnxruntime"),
                                   device=params.get("device", "cpu"), threads=threads, progress=False)
        except VpsdeError as e:
            raise RuntimeError(f"vpsde: {e}") from None  # fails the model load with vpsde's message
        self.max_num = int(params.get("max_num", "1024"))
        self.task = self.bundle.manifest.sampler.task
        self.loop = None
        if params.get("batching", "per-request") == "continuous":
            reason = self._open_continuous(params, threads, config.get("name", "vpsde"), args.get("model_instance_name", ""))
            if reason is not None:  # never change bits silently: one batch per request, as offline sampling
                print(f"vpsde: continuous batching off, each request runs as its own batch: {reason}", flush=True)

    def _open_continuous(self, params: dict[str, str], threads: int | None, model: str, instance: str) -> str | None:
        """Start the scheduler's loop -> None, or why this bundle is served per request."""
        from vpsde.runtime.noise import PHILOX_ID
        from vpsde.runtime.scheduler import StepScheduler
        from vpsde.serving.continuous import ContinuousLoop

        manifest = self.bundle.manifest
        if manifest.noise.generator != PHILOX_ID:
            return f"noise.generator {manifest.noise.generator!r} depends on the batch"
        try:
            sched, problem = StepScheduler.open(self.bundle, backend=params.get("backend", "onnxruntime"),
                                                device=params.get("device", "cpu"), threads=threads,
                                                slots=int(params.get("slots", "16")))
        except VpsdeError as e:
            raise RuntimeError(f"vpsde: {e}") from None
        if problem is not None:
            sched.close()
            return problem
        self.loop = ContinuousLoop(sched, on_tick=_gauges(model, instance))
        return None

    def execute(self, requests: list) -> list:
        import triton_python_backend_utils as pb_utils

        invalid = getattr(pb_utils.TritonError, "INVALID_ARG", None)

        def error(message: str, bad_request: bool = False):
            code = invalid if bad_request and invalid is not None else None
            err = pb_utils.TritonError(f"vpsde: {message}", code) if code is not None else \
                pb_utils.TritonError(f"vpsde: {message}")
            return pb_utils.InferenceResponse(output_tensors=[], error=err)

        if self.loop is not None:
            return self._execute_continuous(requests, pb_utils, error)
        responses = []
        for request in requests:
            def get(name, request=request):
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                return None if tensor is None else tensor.as_numpy()
            try:
                if self.task == "likelihood":
                    req, points = parse_likelihood_request(get, self.bundle.manifest, self.max_num)
                else:
                    req = parse_request(get, self.bundle.manifest, self.max_num)
            except VpsdeError as e:
                responses.append(error(str(e), bad_request=True))
                continue
            try:
                if self.task == "likelihood":
                    output = ("logp", self.sampler.log_likelihood(points, req.seed, first_sample=req.first_sample))
                else:
                    output = ("samples", self.sampler.sample(req.num, req.seed, first_sample=req.first_sample,
                                                             conditioning=dict(req.conditioning) or None))
            except VpsdeError as e:
                responses.append(error(str(e)))
                continue
            except Exception as e:  # a bug must not take the instance down: report it on this request
                responses.append(error(f"{type(e).__name__}: {e}"))
                continue
            name, value = output
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(name, np.ascontiguousarray(value[None]))]))
        return responses

    def _execute_continuous(self, requests: list, pb_utils, error) -> None:
        """Hand each request to the scheduler's loop; its one response goes through its response sender when its
        rows finish (a bad request is answered at once)."""
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        output = "logp" if self.task == "likelihood" else "samples"
        for request in requests:
            sender = request.get_response_sender()

            def get(name, request=request):
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                return None if tensor is None else tensor.as_numpy()

            def reply(result, message, sender=sender):
                if message is not None:
                    sender.send(error(message), flags=final)
                else:
                    sender.send(pb_utils.InferenceResponse(
                        output_tensors=[pb_utils.Tensor(output, np.ascontiguousarray(result[None]))]), flags=final)

            try:
                if self.task == "likelihood":
                    req, points = parse_likelihood_request(get, self.bundle.manifest, self.max_num)
                else:
                    req, points = parse_request(get, self.bundle.manifest, self.max_num), None
            except VpsdeError as e:
                sender.send(error(str(e), bad_request=True), flags=final)
                continue
            self.loop.submit(req, reply, getattr(request, "is_cancelled", lambda: False), data=points)
        return None

    def finalize(self) -> None:
        if self.loop is not None:
            self.loop.close()
        self.sampler = None


def _gauges(model: str, instance: str):
    """-> on_tick(status) setting this instance's Triton gauges from ``ContinuousLoop.status()``; a no-op where the
    backend has no custom metrics."""
    import triton_python_backend_utils as pb_utils

    family = getattr(pb_utils, "MetricFamily", None)
    if family is None:
        return lambda status: None
    labels = {"model": model, "instance": instance}
    families, gauges = [], {}  # a family must outlive its metrics: both live in this closure
    for key, name, text in (("busy", "rows_running", "rows in flight in the continuous-batching scheduler"),
                            ("queued", "rows_waiting", "rows waiting for a scheduler slot"),
                            ("slots", "slots", "the most rows the scheduler runs at once")):
        families.append(family(name=f"vpsde_{name}", description=text, kind=family.GAUGE))
        gauges[key] = families[-1].Metric(labels=labels)

    def on_tick(status: dict[str, int]) -> None:
        for key, gauge in gauges.items():
            gauge.set(status[key])
    on_tick.families = families

    return on_tick
