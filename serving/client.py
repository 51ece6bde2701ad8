"""A client for vpsde models on Triton (``tritonclient``, HTTP or gRPC) that returns numpy arrays."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from vpsde.runtime.errors import BackendUnavailable, VpsdeError


class ServerError(VpsdeError):
    """The server answered with an error (its message, one line)."""


def request_samples(url: str, seed: int, num: int, first_sample: int = 0, *, model: str = "vpsde",
                    protocol: str = "http", conditioning: Mapping[str, np.ndarray] | None = None,
                    timeout: float = 600.0) -> np.ndarray:
    """Ask the vpsde model ``model`` at ``url`` ("HOST:PORT", or "http://HOST:PORT" / "grpc://HOST:PORT", whose
    scheme then sets the protocol) for samples ``first_sample .. first_sample + num - 1`` of ``seed`` -> float32
    [num, *sample_shape]. ``conditioning``: the bundle's conditioning arrays, each [num, *S] (broadcast a shared
    one yourself; the server also takes [1, 1, *S] from raw clients)."""
    inputs = [("seed", np.array([[seed]], np.uint64)), ("first_sample", np.array([[first_sample]], np.uint64)),
              ("num", np.array([[num]], np.int32))]
    for name, arr in (conditioning or {}).items():
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if arr.ndim < 1 or arr.shape[0] != num:
            raise VpsdeError(f"conditioning {name!r}: expected [num, *sample_shape] with num = {num}, got {list(arr.shape)}")
        inputs.append((name, arr[None]))
    return _infer(url, protocol, model, inputs, "samples", timeout)[0]


def request_log_likelihood(url: str, data: np.ndarray, seed: int = 0, first_sample: int = 0, *, model: str = "vpsde",
                           protocol: str = "http", timeout: float = 600.0) -> np.ndarray:
    """Ask the vpsde likelihood model ``model`` at ``url`` (as for :func:`request_samples`) for log p of each row of
    ``data`` (float32 [N, *sample_shape], points in the model's space; images dequantized by the caller with
    ``vpsde.runtime.likelihood.dequantize``) -> float64 [N], nats; row i's probes are sample ``first_sample + i``'s."""
    data = np.ascontiguousarray(data, dtype=np.float32)
    inputs = [("seed", np.array([[seed]], np.uint64)), ("first_sample", np.array([[first_sample]], np.uint64)),
              ("data", data[None])]
    return _infer(url, protocol, model, inputs, "logp", timeout)[0]


TRITON_DTYPES = {np.dtype(np.uint64): "UINT64", np.dtype(np.int32): "INT32", np.dtype(np.float32): "FP32"}


def _infer(url: str, protocol: str, model: str, inputs: list[tuple[str, np.ndarray]], output: str,
           timeout: float) -> np.ndarray:
    """One inference call with ``inputs`` (name, array) -> the array of ``output``; errors as :class:`ServerError`."""
    url, protocol = split_url(url, protocol)
    if protocol == "http":
        import tritonclient.http as tc
    elif protocol == "grpc":
        import tritonclient.grpc as tc
    else:
        raise BackendUnavailable(f"protocol: expected http or grpc, got {protocol!r}")
    from tritonclient.utils import InferenceServerException

    tensors = []
    for name, value in inputs:
        t = tc.InferInput(name, list(value.shape), TRITON_DTYPES[value.dtype])
        t.set_data_from_numpy(value)
        tensors.append(t)
    client = None
    try:
        client = tc.InferenceServerClient(url=url, network_timeout=timeout) if protocol == "http" else \
            tc.InferenceServerClient(url=url)
        result = client.infer(model, tensors, outputs=[tc.InferRequestedOutput(output)],
                              **({"client_timeout": timeout} if protocol == "grpc" else {}))
    except InferenceServerException as e:
        raise ServerError(_with_hint(f"{url} ({protocol}): {e.message() or e}")) from None
    except OSError as e:
        raise ServerError(_with_hint(f"{url} ({protocol}): {e}")) from None
    except Exception as e:  # noqa: BLE001 - e.g. geventhttpclient's HTTPParseError: not an HTTP server
        raise ServerError(f"{url} ({protocol}): {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}; "
                          f"is this the server's {protocol} port? (--protocol http|grpc)") from None
    finally:
        if client is not None:
            client.close()
    return result.as_numpy(output)


def _with_hint(message: str) -> str:
    """``message``, with what to check when nothing listens at the address (both protocols say "Connection refused")."""
    if "Connection refused" in message:
        return message + "; nothing listens there: start the server (vpsde serve) or check HOST:PORT"
    return message


def split_url(url: str, protocol: str) -> tuple[str, str]:
    """("HOST:PORT", protocol) from ``url``; a scheme (http://, grpc://) sets the protocol, a trailing / is dropped."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url.rstrip("/"), protocol
    if scheme not in ("http", "grpc"):
        raise BackendUnavailable(f"url {url!r}: expected HOST:PORT, http://HOST:PORT or grpc://HOST:PORT")
    return rest.rstrip("/"), scheme


@dataclass(frozen=True)
class ServedModel:
    """What a served vpsde model's config.pbtxt says of its bundle (``serving/repository.py`` writes it); None where
    the config does not say (a repository written by an older vpsde, or another model)."""

    task: str | None  # the bundle's sampler.task: "sample" or "likelihood"
    sample_shape: tuple[int, ...] | None  # from the samples output's (or the data input's) dims [-1, *sample_shape]
    value_range: tuple[float, float] | None  # model.value_range (since 0.4.2)
    noise_generator: str | None  # noise.generator (since 0.5.6)
    conditioning: tuple[str, ...] = ()  # the inputs beyond the request's own (inpainting: known, mask)


def served_model(url: str, model: str = "vpsde", protocol: str = "http") -> ServedModel:
    """Read the config of ``model`` at ``url`` (as for :func:`request_samples`); :class:`ServerError` when it cannot."""
    import json

    url, protocol = split_url(url, protocol)
    if protocol == "http":
        import tritonclient.http as tc
    else:
        import tritonclient.grpc as tc
    client = None
    try:
        client = tc.InferenceServerClient(url=url)
        config = client.get_model_config(model) if protocol == "http" else \
            client.get_model_config(model, as_json=True)["config"]
    except Exception as e:  # noqa: BLE001 - tritonclient's own errors, refused connections, not a Triton port
        message = (e.message() if callable(getattr(e, "message", None)) else str(e)) or type(e).__name__
        raise ServerError(_with_hint(f"{url} ({protocol}): model {model!r}'s config: {message.splitlines()[0]}")) from None
    finally:
        if client is not None:
            client.close()
    params = {k: v.get("string_value") for k, v in config.get("parameters", {}).items()}
    tensors = {t["name"]: t for t in config.get("input", []) + config.get("output", [])}
    shaped = tensors.get("samples") or tensors.get("data")
    try:
        lo_hi = json.loads(params["value_range"]) if params.get("value_range") else None
        value_range = (float(lo_hi[0]), float(lo_hi[1])) if lo_hi else None
        sample_shape = tuple(int(d) for d in shaped["dims"][1:]) if shaped else None
    except (ValueError, TypeError, IndexError, KeyError):
        raise ServerError(f"{url} ({protocol}): model {model!r}'s config is not a vpsde model's (value_range "
                          f"{params.get('value_range')!r})") from None
    from vpsde.serving.repository import REQUEST_INPUTS

    conditioning = tuple(t["name"] for t in config.get("input", []) if t["name"] not in REQUEST_INPUTS)
    return ServedModel(params.get("task"), sample_shape, value_range, params.get("noise_generator"), conditioning)


def served_value_range(url: str, model: str = "vpsde", protocol: str = "http") -> tuple[float, float] | None:
    """The data range the served bundle records (config.pbtxt parameter ``value_range``), or None (no image model,
    a repository written before vpsde 0.4.2, or a config that cannot be read: the picture it draws is optional)."""
    try:
        return served_model(url, model, protocol).value_range
    except ServerError:
        return None
