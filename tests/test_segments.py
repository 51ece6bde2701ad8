"""Requests sampled together (Sampler.sample_segments, what a server's dynamic batching uses): every request gets
exactly its own in-process samples, whatever it shares a batch with; and the Triton model's request parsing."""

import numpy as np
import pytest

from vpsde.runtime import InputError, Sampler
from vpsde.serving.triton_model import RequestError, parse_request


@pytest.mark.parametrize("batch_size", [None, 3, 7])
def test_requests_with_different_seeds_share_batches_bit_for_bit(gmm_bundle, batch_size):
    s = Sampler(gmm_bundle, progress=False, threads=1)
    rng = np.random.default_rng(3)
    reqs = [(int(rng.integers(0, 2**64, dtype=np.uint64)), int(rng.integers(0, 2**40)), int(rng.integers(1, 6)))
            for _ in range(6)] + [(2**64 - 1, 2**64 - 2, 2)]
    outs = s.sample_segments(reqs, batch_size=batch_size)
    for out, (seed, first, num) in zip(outs, reqs):
        np.testing.assert_array_equal(out, s.sample(num, seed, first_sample=first))


def test_segments_refuse_what_sample_refuses(gmm_bundle):
    s = Sampler(gmm_bundle, progress=False)
    with pytest.raises(InputError, match="request 1: num must be >= 1"):
        s.sample_segments([(0, 0, 2), (1, 0, 0)])
    with pytest.raises(InputError, match="request 0: sample indices"):
        s.sample_segments([(0, 2**64 - 1, 2)])


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
