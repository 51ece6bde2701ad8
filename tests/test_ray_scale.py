"""Scale-out on Ray: sharded runs equal one process bit for bit, survive a killed worker (Ray restarts and
retries) and a killed driver (the rerun resumes), refuse a changed run, and never import torch on a worker.

Ray runs for real: a local Ray instance started by the driver, inside a private network namespace (`unshare -n`,
loopback only), so every byte of cluster traffic stays on 127.0.0.1. Skipped with the reason where Ray or network
namespaces are not available."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from vpsde.export import VPSDE, export_bundle, load_model
from vpsde.runtime import BundleError, Sampler
from vpsde.runtime.backends import open_backend
from vpsde.runtime.scheduler import probe_row_invariance
from vpsde.scale import load_samples
from vpsde.scale.shards import INDEX_NAME, RunKey, open_run, write_shard

pytest.importorskip("ray", reason="Ray is not installed (pip install 'vpsde[ray]')")


def _netns_command(argv: list[str]) -> list[str]:
    if subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode != 0:
        pytest.skip("no network namespaces here (unshare -n failed): Ray would have to use a non-loopback address")
    inner = " ".join(shlex.quote(a) for a in argv)
    return ["unshare", "-n", "bash", "-c", f"ip link set lo up && exec {inner}"]


def _env() -> dict[str, str]:
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def _drive(script: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a Python driver ``script`` in its own network namespace."""
    r = subprocess.run(_netns_command([sys.executable, "-c", textwrap.dedent(script)]), capture_output=True,
                       text=True, timeout=timeout, env=_env())
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return r


def _start_digits_driver(bundles, out):
    """`vpsde sample --ray` of 40 digits in shards of 4 on one worker, in its own namespace and session: (argv,
    the driver's process)."""
    cli = [sys.executable, "-m", "vpsde.cli.main", "sample", str(bundles["digits"].root), "--num", "40", "--seed",
           "5", "--ray", "--shard-size", "4", "--workers", "1", "--no-progress", "--out", str(out)]
    return cli, subprocess.Popen(_netns_command(cli), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(),
                                 start_new_session=True)


def _wait_for_a_shard(out, timeout: float = 300) -> None:
    """Until the run in ``out`` has recorded its first finished shard (or ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if json.loads((out / INDEX_NAME).read_text())["shards"]:
                return
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.1)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    return {"em": export_bundle(load_model("gmm:dim=3", VPSDE()), root / "em", steps=40, grid="uniform",
                                log=lambda _: None),
            "dpmpp": export_bundle(load_model("unet-random:channels=8", VPSDE()), root / "dpmpp", sampler="dpmpp-2m",
                                   steps=6, log=lambda _: None),
            "digits": export_bundle(load_model("digits", VPSDE()), root / "digits", steps=200, grid="uniform", value_range=(-1, 1),
                                    log=lambda _: None),
            "likelihood": export_bundle(load_model("gmm:dim=3", VPSDE()), root / "likelihood", sampler="likelihood",
                                        steps=6, log=lambda _: None)}


def test_sharded_runs_equal_one_process_and_stay_torch_free(bundles, tmp_path):
    """N not divisible by the shard size, first_sample offsets (one past 2^32), em and dpmpp-2m: every sample
    equals the single-process Sampler's; workers load their own copy of the bundle and never import torch."""
    cases = [("em", 103, 20, 11, 7), ("dpmpp", 13, 5, 2**32 - 3, 2**40 + 1)]
    runs = [(name, str(bundles[name].root), num, shard, first, seed) for name, num, shard, first, seed in cases]
    _drive(f"""
        import json
        from vpsde.scale import sample_on_ray
        seen = []
        for name, root, num, shard, first, seed in {runs!r}:
            report = sample_on_ray(root, num, seed, "{tmp_path}/" + name, first_sample=first, shard_size=shard,
                                   workers=2, progress=False, on_shard=lambda r: seen.append(r["bundle_root"]))
            assert not report.torch_on_workers, "torch was imported on a worker"
        json.dump(seen, open("{tmp_path}/roots.json", "w"))
    """)
    for name, num, shard, first, seed in cases:
        got = load_samples(tmp_path / name)
        want = Sampler(bundles[name], progress=False).sample(num, seed, first_sample=first, batch_size=shard)
        assert len(got) == num and got.first_sample == first
        np.testing.assert_array_equal(np.asarray(got), want)
        np.testing.assert_array_equal(got[num - 3:num - 1], want[num - 3:num - 1])
        index = json.loads((tmp_path / name / INDEX_NAME).read_text())
        assert index["complete"] and index["bundle_digest"] == bundles[name].digest and index["seed"] == seed
        assert [s["num"] for s in index["shards"]] == [shard] * (num // shard) + ([num % shard] if num % shard else [])
    roots = json.loads((tmp_path / "roots.json").read_text())
    assert roots and not {str(b.root) for b in bundles.values()} & set(roots)  # the bundle travelled by value


def test_a_killed_worker_is_restarted_by_ray_and_nothing_is_lost(bundles, tmp_path):
    out = tmp_path / "run"
    _drive(f"""
        import os, signal
        from vpsde.scale import sample_on_ray
        killed = []
        def kill_once(result):
            if not killed:
                killed.append(result["worker"])
                os.kill(result["worker"], signal.SIGKILL)  # it has more shards in flight
        sample_on_ray("{bundles['em'].root}", 120, 3, "{out}", shard_size=10, workers=2, progress=False,
                      on_shard=kill_once)
        assert killed
    """)
    np.testing.assert_array_equal(np.asarray(load_samples(out)),
                                  Sampler(bundles["em"], progress=False).sample(120, 3, batch_size=10))
    assert sorted(p.name for p in (out / "shards").iterdir()) == [f"{s:020d}-000010.npy" for s in range(0, 120, 10)]


def test_a_killed_driver_resumes_and_a_changed_run_is_refused(bundles, tmp_path):
    out = tmp_path / "run"
    cli, p = _start_digits_driver(bundles, out)
    _wait_for_a_shard(out)
    os.killpg(p.pid, signal.SIGKILL)  # the driver and the local Ray instance it started
    p.wait(timeout=60)
    index = json.loads((out / INDEX_NAME).read_text())
    assert index["shards"] and not index["complete"], "the driver finished before it was killed"
    done_before = len(index["shards"])
    r = subprocess.run(_netns_command(cli), capture_output=True, text=True, timeout=600, env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    computed, reused = (int(n) for n in re.search(r"(\d+) shards computed, (\d+) reused", r.stdout).groups())
    assert reused >= done_before and computed + reused == 10
    got = np.asarray(load_samples(out))
    np.testing.assert_array_equal(got, Sampler(bundles["digits"], progress=False).sample(40, 5, batch_size=4))
    # the digits UNet passes the row-invariance probe, so shards of 4 equal one process at any batch size too
    sampler = Sampler(bundles["digits"], progress=False)
    opened = open_backend("onnxruntime", sampler.bundle, "cpu", None)
    assert probe_row_invariance(sampler.manifest, opened, (1, 2, 4, 7, 40)) is None
    for batch in (7, 40):
        np.testing.assert_array_equal(got, sampler.sample(40, 5, batch_size=batch))
    assert (out / "grid.png").is_file()
    # the same directory with another seed (or shard size) is refused before any work
    r = subprocess.run(cli[:cli.index("--seed") + 1] + ["6"] + cli[cli.index("--seed") + 2:], capture_output=True,
                       text=True, timeout=120, env=_env())
    assert r.returncode == 2 and "holds another run: seed 5 (now 6)" in r.stderr, r.stderr


def test_likelihoods_on_ray_equal_one_process_resume_and_refuse_other_data(bundles, tmp_path):
    """`vpsde likelihood --ray`: 23 inputs in shards of 5 on 2 workers (a first index past 2^33, a fresh seed) give
    the in-process log p bit for bit, float64 shards; a rerun reuses every shard; other data in the same directory
    is refused before any work."""
    b = bundles["likelihood"]
    rng = np.random.default_rng()
    points = rng.standard_normal((23, 3)).astype(np.float32)
    np.save(tmp_path / "points.npy", points)
    seed, first, out = int(rng.integers(2**63)), 2**33 + 1, tmp_path / "run"
    cli = [sys.executable, "-m", "vpsde.cli.main", "likelihood", str(b.root), "--data", str(tmp_path / "points.npy"),
           "--seed", str(seed), "--first-sample", str(first), "--ray", "--shard-size", "5", "--workers", "2",
           "--no-progress", "--out", str(out)]
    r = subprocess.run(_netns_command(cli), capture_output=True, text=True, timeout=600, env=_env())
    assert r.returncode == 0 and "5 shards computed, 0 reused" in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]
    want = Sampler(b, progress=False).log_likelihood(points, seed, first_sample=first, batch_size=5)
    got = np.asarray(load_samples(out))
    assert got.dtype == np.float64 and np.isfinite(got).all()
    np.testing.assert_array_equal(got, want)
    assert json.loads((out / "likelihood.json").read_text())["nll"] == (-want).tolist()
    index = json.loads((out / INDEX_NAME).read_text())
    assert index["dtype"] == "float64" and index["sample_shape"] == [] and len(index["data_sha256"]) == 64
    r = subprocess.run(_netns_command(cli), capture_output=True, text=True, timeout=600, env=_env())
    assert r.returncode == 0 and "0 shards computed, 5 reused" in r.stdout, r.stderr[-3000:]
    points[7, 1] += 1.0
    np.save(tmp_path / "points.npy", points)
    r = subprocess.run(cli, capture_output=True, text=True, timeout=120, env=_env())
    assert r.returncode == 2 and "holds another run: data_sha256" in r.stderr, r.stderr


def test_sigterm_to_a_ray_driver_exits_143(bundles, tmp_path):
    """ray.init replaces the SIGTERM handler (the driver exited 15, not 143, and skipped vpsde's clean-up)."""
    out = tmp_path / "run"
    cli, p = _start_digits_driver(bundles, out)
    try:
        _wait_for_a_shard(out)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=120)
        assert p.returncode == 143 and b"terminated" in err, (p.returncode, err[-2000:])
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # the local Ray instance the driver started
        except ProcessLookupError:
            pass


@pytest.mark.parametrize("address", ["127.0.0.1:1", "ray://127.0.0.1:1"])
def test_an_address_with_nothing_listening_is_one_line_at_once_and_leaves_nothing(bundles, tmp_path, address):
    """A GCS address and a Ray client address (ray://: "a file: ray client connection timeout" and a warning, after
    ray.init's own wait, before 0.5.12) with nothing listening: one line at once, and no index.json or shard
    directory left in --out (it held both)."""
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "vpsde.cli.main", "sample", str(bundles["em"].root), "--num", "4",
                        "--ray", address, "--out", str(tmp_path / "o")], capture_output=True, text=True,
                       timeout=120, env=_env())
    assert r.returncode == 2 and f"--ray {address}: no Ray cluster answers there" in r.stderr \
        and len(r.stderr.splitlines()) == 1, r.stderr
    assert time.monotonic() - t0 < 60  # ray.init alone did not answer in 300 s
    assert not (tmp_path / "o").exists()
    (tmp_path / "o").mkdir()  # an --out the user made stays, empty
    r = subprocess.run([sys.executable, "-m", "vpsde.cli.main", "sample", str(bundles["em"].root), "--num", "4",
                        "--ray", address, "--out", str(tmp_path / "o")], capture_output=True, text=True,
                       timeout=120, env=_env())
    assert r.returncode == 2 and list((tmp_path / "o").iterdir()) == []


@pytest.mark.parametrize("flag, value", [("--worker-cpus", "-1"), ("--worker-cpus", "nan"), ("--worker-cpus", "inf"),
                                         ("--worker-gpus", "-1")])
def test_worker_resources_are_checked(bundles, tmp_path, flag, value):
    r = subprocess.run([sys.executable, "-m", "vpsde.cli.main", "sample", str(bundles["em"].root), "--num", "4",
                        "--ray", flag, value, "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "expected a finite number >= 0" in r.stderr, r.stderr


# -- without Ray: the on-disk format and the worker class --------------------------------------------------
def test_resume_redoes_bad_shards_only(bundles, tmp_path):
    b = bundles["em"]
    key = RunKey(b.digest, 1, 0, 10, 4, b.manifest.noise.generator, tuple(b.manifest.model.sample_shape))
    index, todo = open_run(tmp_path, key)
    assert [s.first for s in todo] == [0, 4, 8]
    rng = np.random.default_rng(0)
    for shard in todo:
        index.done[shard.first] = write_shard(tmp_path, shard, rng.standard_normal((shard.num, 3)).astype(np.float32))
    index.write(tmp_path)
    with open(tmp_path / todo[1].file, "r+b") as f:  # a shard corrupted after it was recorded
        f.seek(-4, 2)
        f.write(b"\x00\x00\x80\x7f")
    (tmp_path / todo[2].file).unlink()  # and one lost
    _, again = open_run(tmp_path, key)
    assert [s.first for s in again] == [4, 8]
    with pytest.raises(Exception, match="not complete"):
        load_samples(tmp_path)


def test_a_worker_checks_the_digest_of_what_it_received(bundles, tmp_path):
    from vpsde.scale.ray_sampling import ShardWorker, bundle_payload

    payload = bundle_payload(bundles["em"])
    worker = ShardWorker(payload, bundles["em"].digest)
    got = worker.sample(5, 3, 9, None)
    np.testing.assert_array_equal(got["values"], Sampler(bundles["em"], progress=False).sample(3, 9, first_sample=5))
    edited = dict(payload)
    edited["manifest.json"] = payload["manifest.json"].replace(b'"steps": 40', b'"steps": 41')
    with pytest.raises(BundleError, match="edited after export"):
        ShardWorker(edited, bundles["em"].digest)
    with pytest.raises(BundleError, match="not the bundle you pinned"):
        ShardWorker(payload, "0" * 64)


def test_a_worker_computes_the_log_likelihoods_of_its_rows_and_tasks_do_not_mix(bundles, tmp_path):
    from vpsde.runtime.errors import InputError
    from vpsde.scale import likelihood_on_ray, sample_on_ray
    from vpsde.scale.ray_sampling import ShardWorker, bundle_payload

    b = bundles["likelihood"]
    points = np.random.default_rng().standard_normal((9, 3)).astype(np.float32)
    got = ShardWorker(bundle_payload(b), b.digest).log_likelihood(20, points, 4, 3, 7)
    want = Sampler(b, progress=False).log_likelihood(points[4:7], 7, first_sample=20)
    assert got["values"].dtype == np.float64 and np.isfinite(want).all()
    np.testing.assert_array_equal(got["values"], want)
    with pytest.raises(InputError, match="use likelihood_on_ray"):
        sample_on_ray(b, 4, 0, tmp_path / "a")
    with pytest.raises(InputError, match="--sampler likelihood"):
        likelihood_on_ray(bundles["em"], points, 0, tmp_path / "b")
    assert not any(tmp_path.iterdir())  # refused before any run directory was made
