"""The Triton model's request parsing (no server needed): the contract's inputs, their dtypes and shapes, then the
request gate (runtime/request.py): limits, index range and conditioning, with the same messages as the API's."""

import numpy as np
import pytest

from vpsde.export import VPSDE, export_bundle, load_model
from vpsde.serving.triton_model import RequestError, parse_likelihood_request, parse_request


@pytest.fixture(scope="module")
def manifests(tmp_path_factory):
    root = tmp_path_factory.mktemp("triton-request")
    gmm = load_model("gmm", VPSDE())  # sample shape (2,)
    return {"em": export_bundle(gmm, root / "em", steps=4, grid="uniform", log=lambda _: None).manifest,
            "inpaint": export_bundle(gmm, root / "inpaint", sampler="inpaint", steps=4, grid="uniform",
                                     log=lambda _: None).manifest,
            "likelihood": export_bundle(gmm, root / "likelihood", sampler="likelihood", steps=2,
                                        log=lambda _: None).manifest}


def _getter(**arrays):
    return lambda name: arrays.get(name)


def u(v):
    return np.array([[v]], np.uint64)


def test_parse_request(manifests):
    em = manifests["em"]
    ok = parse_request(_getter(seed=u(5), first_sample=u(2), num=np.array([[3]], np.int32)), em, 8)
    assert (ok.seed, ok.first_sample, ok.num, dict(ok.conditioning)) == (5, 2, 3, {})
    for arrays, message in [
        (dict(seed=u(5), first_sample=u(2)), "input 'num' is missing"),
        (dict(seed=u(5), first_sample=u(2), num=np.array([[9]], np.int32)), r"num must be in \[1, 8\]"),
        (dict(seed=u(5), first_sample=u(2), num=np.array([[0]], np.int32)), r"num must be in \[1, 8\]"),
        (dict(seed=u(5), first_sample=u(2**64 - 2), num=np.array([[3]], np.int32)), r"must lie in \[0, 2\^64\)"),
        (dict(seed=np.array([[5], [6]], np.uint64), first_sample=u(2), num=np.array([[1]], np.int32)),
         "one request per call"),
    ]:
        with pytest.raises(RequestError, match=message):
            parse_request(_getter(**arrays), em, 8)


def test_parse_request_conditioning(manifests):
    inpaint = manifests["inpaint"]
    known = np.ones((1, 3, 2), np.float32)
    got = parse_request(_getter(seed=u(1), first_sample=u(0), num=np.array([[3]], np.int32), known=known,
                                mask=np.ones((1, 1, 2), np.float32)), inpaint, 8)
    assert got.conditioning["known"].shape == (3, 2) and got.conditioning["mask"].shape == (2,)
    with pytest.raises(RequestError, match="input 'mask' is missing"):
        parse_request(_getter(seed=u(1), first_sample=u(0), num=np.array([[3]], np.int32), known=known), inpaint, 8)
    with pytest.raises(RequestError, match="NaN"):
        parse_request(_getter(seed=u(1), first_sample=u(0), num=np.array([[3]], np.int32), known=known * np.nan,
                              mask=np.ones((1, 1, 2), np.float32)), inpaint, 8)
    with pytest.raises(RequestError, match=r"expected shape \[2\] or \[3, 2\]"):  # 2 rows for num = 3
        parse_request(_getter(seed=u(1), first_sample=u(0), num=np.array([[3]], np.int32), known=known[:, :2],
                              mask=np.ones((1, 1, 2), np.float32)), inpaint, 8)


def test_parse_likelihood_request(manifests):
    lik = manifests["likelihood"]
    data = np.random.default_rng().standard_normal((1, 5, 2)).astype(np.float32)
    req, points = parse_likelihood_request(_getter(seed=u(3), first_sample=u(7), data=data), lik, 8)
    assert (req.seed, req.first_sample, req.num) == (3, 7, 5) and np.array_equal(points, data[0])
    for arrays, message in [
        (dict(seed=u(3), first_sample=u(7)), "input 'data' is missing"),
        (dict(seed=u(3), data=data), "input 'first_sample' is missing"),
        (dict(seed=u(3), first_sample=u(7), data=data[0]), r"expected shape \[1, N, 2\]"),
        (dict(seed=u(3), first_sample=u(7), data=np.concatenate([data, data])), "one request per call"),
        (dict(seed=u(3), first_sample=u(7), data=data[:, :, :1]), r"expected float32 points \[N >= 1, 2\]"),
        (dict(seed=u(3), first_sample=u(7), data=data.astype(np.float64)), "expected float32 points"),
        (dict(seed=u(3), first_sample=u(7), data=np.where(data > 0, np.inf, data)), "NaN or Infinity"),
        (dict(seed=u(3), first_sample=u(7), data=np.ones((1, 9, 2), np.float32)), r"num must be in \[1, 8\]"),
        (dict(seed=u(3), first_sample=u(2**64 - 2), data=data), r"must lie in \[0, 2\^64\)"),
    ]:
        with pytest.raises(RequestError, match=message):
            parse_likelihood_request(_getter(**arrays), lik, 8)
