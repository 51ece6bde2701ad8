"""The Triton model's request parsing (no server needed): the contract's inputs, their dtypes and shapes, the
limits, and conditioning."""

import numpy as np
import pytest

from vpsde.serving.triton_model import RequestError, parse_request


def _getter(**arrays):
    return lambda name: arrays.get(name)


def test_parse_request():
    u = lambda v: np.array([[v]], np.uint64)  # noqa: E731
    ok = parse_request(_getter(seed=u(5), first_sample=u(2), num=np.array([[3]], np.int32)), [], (2,), 8)
    assert ok == (5, 2, 3, {})
    for arrays, message in [
        (dict(seed=u(5), first_sample=u(2)), "input 'num' is missing"),
        (dict(seed=u(5), first_sample=u(2), num=np.array([[9]], np.int32)), r"num must be in \[1, 8\]"),
        (dict(seed=np.array([[5], [6]], np.uint64), first_sample=u(2), num=np.array([[1]], np.int32)),
         "one request per call"),
    ]:
        with pytest.raises(RequestError, match=message):
            parse_request(_getter(**arrays), [], (2,), 8)
    known = np.ones((1, 3, 2), np.float32)
    got = parse_request(_getter(seed=u(1), first_sample=u(0), num=np.array([[3]], np.int32), known=known,
                                mask=np.ones((1, 1, 2), np.float32)), ["known", "mask"], (2,), 8)
    assert got[3]["known"].shape == (3, 2) and got[3]["mask"].shape == (2,)
    with pytest.raises(RequestError, match="input 'mask' is missing"):
        parse_request(_getter(seed=u(1), first_sample=u(0), num=np.array([[3]], np.int32), known=known),
                      ["known", "mask"], (2,), 8)
