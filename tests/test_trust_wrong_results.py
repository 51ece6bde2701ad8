"""Trust boundary, wrong results that must become errors: values that used to wrap, truncate, be cast or run
forever are refused with the field or argument named, in the Python runtime and the C++ host alike."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from conftest import copy_bundle, edit_manifest, run_host

from vpsde.models.shipped import WEIGHTS_DIR, WeightsError, load_shipped
from vpsde.runtime import Bundle, BundleError, InputError, Sampler


@pytest.fixture
def bundle(gmm_bundle, tmp_path):
    return copy_bundle(gmm_bundle, tmp_path / "b")


def _cpp(host, root, tmp_path, *args):
    return run_host(host / "vpsde-sample", root, "--seed", 0, "--out", tmp_path / "x.npy", *args, timeout=120)


def test_cpp_sample_indices_do_not_wrap(host, gmm_bundle, tmp_path):
    """--first-sample 2^64-1 --num 2 used to wrap to sample 0; the Python runtime refuses it the same way."""
    r = _cpp(host, gmm_bundle.root, tmp_path, "--num", 2, "--first-sample", 2**64 - 1)
    assert r.returncode == 2 and "passes the last sample index" in r.stderr and not (tmp_path / "x.npy").exists()
    with pytest.raises(InputError, match="sample indices"):
        Sampler(gmm_bundle, progress=False).sample(2, first_sample=2**64 - 1)
    r = _cpp(host, gmm_bundle.root, tmp_path, "--num", 1, "--first-sample", 2**64 - 1)  # the last index is valid
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"),
                                  Sampler(gmm_bundle, progress=False).sample(1, first_sample=2**64 - 1))


@pytest.mark.parametrize("args, expect", [
    (["--threads", 4294967297], "--threads: expected 1..1024"),
    (["--threads", 0], "--threads: expected 1..1024"),
    (["--num", 2**64 + 1], "--num: expected a non-negative integer"),
    (["--num", 2**41], "--num: expected 1.."),
    (["--batch", -3], "--batch: expected a non-negative integer"),
])
def test_cpp_arguments_that_used_to_wrap(host, gmm_bundle, tmp_path, args, expect):
    r = _cpp(host, gmm_bundle.root, tmp_path, "--num", 2, *args)
    assert r.returncode == 2 and expect in r.stderr, r.stderr


@pytest.mark.parametrize("edit, field", [
    (lambda d: d["sampler"].update(steps=2**32 + 50), "sampler.steps"),  # C++ used to run 50 steps
    (lambda d: d["sampler"]["program"][0].update(repeat=10**9), "sampler.program[0].repeat"),  # ran forever
    (lambda d: d["sampler"].update(program=[{"graph": "em", "repeat": 1000}, {"graph": "em", "repeat": 1}]),
     "sampler.program"),  # 1000 steps x 1001 calls: over the cap of 10^6 calls per sample
    (lambda d: d["noise"].update(inputs=["noise", "x"]), "noise.inputs"),  # x fed with noise: changed samples
    (lambda d: d["noise"].update(inputs=["noise", "t"]), "noise.inputs"),
    (lambda d: d["model"].update(sample_shape=[1, 100000, 100000]), "model.sample_shape"),  # MemoryError
    (lambda d: d["noise"].update(generator="mt19937"), "noise.generator"),
])
def test_manifest_values_out_of_bounds_are_refused_in_both_hosts(bundle, host, tmp_path, edit, field):
    edit_manifest(bundle, edit)
    with pytest.raises(BundleError, match=re.escape(f"field '{field}")):
        Bundle.load(bundle)
    r = _cpp(host, bundle, tmp_path, "--num", 2)
    assert r.returncode == 2 and field in r.stderr, r.stderr
    assert not (tmp_path / "x.npy").exists()


@pytest.mark.parametrize("kwargs, message", [
    ({"num": 4, "batch_size": -1}, "batch_size must be >= 1"),  # used to return uninitialised memory
    ({"num": 4, "batch_size": 0}, "batch_size must be >= 1"),
    ({"num": 4, "seed": 1.5}, "seed must be an integer"),  # used to truncate silently
    ({"num": 2.0}, "num must be an integer"),
    ({"num": True}, "num must be an integer"),
    ({"num": 2, "first_sample": "3"}, "first_sample must be an integer"),
    ({"num": 10**12}, "more than this machine's"),  # used to end in MemoryError
])
def test_python_api_refuses_what_it_used_to_coerce(gmm_bundle, kwargs, message):
    s = Sampler(gmm_bundle, progress=False)
    with pytest.raises(InputError, match=message):
        s.sample(**kwargs)


def test_numpy_integers_are_accepted(gmm_bundle):
    s = Sampler(gmm_bundle, progress=False)
    np.testing.assert_array_equal(s.sample(np.int64(3), seed=np.uint64(7), batch_size=np.int32(2)),
                                  s.sample(3, seed=7, batch_size=2))


def test_int64_weights_are_refused_not_cast(tmp_path):
    import hashlib

    from safetensors.torch import load, save

    for f in ("digits16.json", "digits16.safetensors"):
        shutil.copy(WEIGHTS_DIR / f, tmp_path / f)
    state = load((tmp_path / "digits16.safetensors").read_bytes())
    name = next(iter(state))
    state[name] = (state[name] * 1000).to(__import__("torch").int64)
    blob = save(state)
    (tmp_path / "digits16.safetensors").write_bytes(blob)
    meta = json.loads((tmp_path / "digits16.json").read_text())
    meta["weights_sha256"] = hashlib.sha256(blob).hexdigest()
    (tmp_path / "digits16.json").write_text(json.dumps(meta))
    with pytest.raises(WeightsError, match=rf"{name}: dtype int64, architecture needs float32"):
        load_shipped(tmp_path / "digits16.json")
