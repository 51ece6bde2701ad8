"""A sample run directory (`vpsde sample --ray --out OUT`) gets the bundle's rules: nothing written or read
through a symlink, nothing read back that vpsde did not write and hash, and an index that is read cannot make
vpsde build a list of a trillion shards. No Ray needed: these are the on-disk format's (scale/shards.py)."""

from __future__ import annotations

import json
import pickle
import time

import numpy as np
import pytest

from vpsde.runtime.errors import VpsdeError
from vpsde.scale import load_samples
from vpsde.scale.shards import INDEX_NAME, RunKey, open_run, write_shard

SHAPE = (3,)


def _finished_run(run_dir, num=10, shard_size=4):
    key = RunKey("ab" * 32, 1, 0, num, shard_size, "philox", SHAPE)
    index, todo = open_run(run_dir, key)
    rng = np.random.default_rng()
    for shard in todo:
        index.done[shard.first] = write_shard(run_dir, shard, rng.standard_normal((shard.num, *SHAPE)).astype(np.float32))
    index.write(run_dir)
    return key, index, todo


def test_a_symlinked_shard_directory_is_refused_and_nothing_is_written_there(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "shards").symlink_to(elsewhere)
    key = RunKey("ab" * 32, 1, 0, 10, 4, "philox", SHAPE)
    with pytest.raises(VpsdeError, match="shard directory is a symlink"):
        open_run(out, key)
    assert list(elsewhere.iterdir()) == []


def test_a_shard_symlinked_to_an_identical_file_outside_is_neither_read_nor_reused(tmp_path):
    out = tmp_path / "out"
    key, index, shards = _finished_run(out)
    target = out / shards[1].file
    outside = tmp_path / "copy.npy"
    outside.write_bytes(target.read_bytes())  # same bytes, same sha256
    target.unlink()
    target.symlink_to(outside)
    with pytest.raises(VpsdeError, match="symlink"):
        load_samples(out)
    _, todo = open_run(out, key)  # a rerun computes it again instead of reusing the link
    assert [s.first for s in todo] == [shards[1].first]
    write_shard(out, todo[0], np.ones((todo[0].num, *SHAPE), np.float32))
    assert not target.is_symlink() and np.load(outside).shape == (4, 3)  # replaced the link, not its target
    assert not np.array_equal(np.load(outside), np.ones((4, 3), np.float32))


@pytest.mark.parametrize("payload", ["pickle", "object-array", "float64", "fortran", "truncated"])
def test_a_shard_replaced_with_its_sha256_updated_is_a_one_line_error(tmp_path, payload):
    out = tmp_path / "out"
    _, index, shards = _finished_run(out)
    path = out / shards[0].file
    if payload == "pickle":
        path.write_bytes(pickle.dumps({"x": 1}))
    elif payload == "object-array":
        np.save(path, np.array([{"x": 1}] * 4, dtype=object), allow_pickle=True)
    elif payload == "float64":
        np.save(path, np.zeros((4, 3)))
    elif payload == "fortran":
        np.save(path, np.asfortranarray(np.ones((4, 3), np.float32)))
    else:
        path.write_bytes(path.read_bytes()[:-8])
    import hashlib

    data = json.loads((out / INDEX_NAME).read_text())
    data["shards"][0]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (out / INDEX_NAME).write_text(json.dumps(data))
    with pytest.raises(VpsdeError) as e:
        load_samples(out)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("edit,message", [
    ({"num": 10**12}, "more than 1000000 shards"),
    ({"num": 10**12, "shard_size": 1}, "more than 1000000 shards"),
    ({"shard_size": 0}, "shard_size"),
    ({"num": -5}, "num"),
    ({"shard_size": "4"}, "shard_size"),
    ({"seed": 1.5}, "seed"),
    ({"dtype": "object"}, "dtype"),
    ({"data_sha256": "../../etc"}, "data_sha256"),
])
def test_an_index_is_bounded_and_checked_before_use(tmp_path, edit, message):
    out = tmp_path / "out"
    _finished_run(out)
    data = json.loads((out / INDEX_NAME).read_text())
    data.update(edit)
    (out / INDEX_NAME).write_text(json.dumps(data))
    t0 = time.perf_counter()
    with pytest.raises(VpsdeError, match=message) as e:
        load_samples(out)
    assert time.perf_counter() - t0 < 10  # it used to build the whole shard list (no answer in 120 s)
    assert str(out / INDEX_NAME) in str(e.value)


def test_a_symlinked_index_is_refused(tmp_path):
    out = tmp_path / "out"
    _finished_run(out)
    moved = tmp_path / "index-elsewhere.json"
    (out / INDEX_NAME).rename(moved)
    (out / INDEX_NAME).symlink_to(moved)
    with pytest.raises(VpsdeError, match="symlink"):
        load_samples(out)


def test_the_samples_read_back_are_the_samples_written(tmp_path):
    out = tmp_path / "out"
    key = RunKey("cd" * 32, 1, 5, 7, 3, "philox", SHAPE)
    index, todo = open_run(out, key)
    written = []
    for shard in todo:
        samples = np.random.default_rng().standard_normal((shard.num, *SHAPE)).astype(np.float32)
        index.done[shard.first] = write_shard(out, shard, samples)
        written.append(samples)
    index.write(out)
    for verify in (True, False):
        got = load_samples(out, verify=verify)
        np.testing.assert_array_equal(np.asarray(got), np.concatenate(written))
        np.testing.assert_array_equal(got[3:5], np.concatenate(written)[3:5])
