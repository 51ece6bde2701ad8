"""Trust boundary, data loss and atomicity: vpsde replaces only what it wrote, replaces it in one step, sweeps the
temporaries of writers that died, turns SIGTERM into a clean exit, and checks what can fail before sampling.

Faults are real: SIGKILL and SIGTERM sent to real processes, concurrent real processes, and a real full disk (a
small tmpfs mounted in a private mount namespace; skipped with the reason where the kernel refuses that)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import copy_bundle, run_host

from vpsde.cli.main import main
from vpsde.export import VPSDE, export_bundle, load_model
from vpsde.models.base import ScoreModel
from vpsde.runtime import Bundle, Sampler
from vpsde.runtime.atomic import STOPPING, Stopped, atomic_dir, atomic_path, replace_dir, sweep_stale

CLI = [sys.executable, "-m", "vpsde.cli.main"]
GMM_EXPORT = ["export", "--model", "gmm", "--steps", "20"]


def _cli(*args, timeout=300, **kw):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout, **kw)


def _debris(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if "vpsde-tmp" in p.name or ".tmp" in p.name)


# -- --force replaces only a bundle vpsde wrote -----------------------------------------------------------
def test_force_refuses_a_directory_that_is_not_a_bundle(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    r = _cli(*GMM_EXPORT, "--out", home, "--force")
    assert r.returncode == 2 and "is not a vpsde bundle" in r.stderr and "Traceback" not in r.stderr
    assert (home / "thesis.tex").read_text() == "years of work"
    note = tmp_path / "note.txt"
    note.write_text("keep me")
    r = _cli(*GMM_EXPORT, "--out", note, "--force")
    assert r.returncode == 2 and "not a directory" in r.stderr and note.read_text() == "keep me"


def test_force_refuses_a_bundle_holding_foreign_files(gmm_bundle, tmp_path):
    root = copy_bundle(gmm_bundle, tmp_path / "b")
    (root / "my-notes.md").write_text("mine")
    r = _cli(*GMM_EXPORT, "--out", root, "--force")
    assert r.returncode == 2 and "my-notes.md" in r.stderr and (root / "my-notes.md").exists()
    (root / "my-notes.md").unlink()
    assert _cli(*GMM_EXPORT, "--out", root, "--force").returncode == 0  # a bundle (with engines) is replaced
    assert Bundle.load(root).manifest.sampler.steps == 20


def test_concurrent_force_exports_both_succeed_and_leave_one_bundle(tmp_path):
    out = tmp_path / "b"
    procs = [subprocess.Popen([*CLI, *GMM_EXPORT, "--out", str(out), "--force"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert all(code == 0 for code, _ in results), results
    Bundle.load(out)
    assert _debris(tmp_path) == []


def test_replace_is_one_atomic_exchange(tmp_path):
    """While directories are swapped into place, a reader never finds the target missing."""
    target = tmp_path / "target"
    target.mkdir()
    (target / "manifest.json").write_text("0")
    missing = []
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            if not (target / "manifest.json").exists():
                missing.append(1)

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(200):
            new = tmp_path / f"new{i}"
            new.mkdir()
            (new / "manifest.json").write_text(str(i))
            replace_dir(new, target)
            assert (new / "manifest.json").read_text() == str(i - 1 if i else 0)  # new now holds the old one
            os.remove(new / "manifest.json")
            new.rmdir()
    finally:
        stop.set()
        t.join()
    assert (target / "manifest.json").read_text() == "199" and not missing


# -- temporaries of dead writers are swept; live ones and other files are not -----------------------------
def _wait_for(predicate, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_kill_9_during_export_leaves_debris_that_the_next_export_sweeps(tmp_path):
    out = tmp_path / "b"
    p = subprocess.Popen([*CLI, "export", "--model", "digits", "--steps", "10", "--out", str(out)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert _wait_for(lambda: list(tmp_path.glob(".b.vpsde-tmp-*")))  # the export is writing its temporary
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    assert _debris(tmp_path), "the killed export left no temporary: the test did not kill it mid-write"
    (tmp_path / ".b.tmp-not-ours").mkdir()  # a name vpsde does not write: never touched
    assert _cli(*GMM_EXPORT, "--out", out).returncode == 0
    assert _debris(tmp_path) == [".b.tmp-not-ours"]


@pytest.mark.parametrize("delay", [0.0, 0.4, 0.8])
def test_sigterm_during_export_exits_cleanly_and_leaves_nothing(tmp_path, delay):
    """Wherever it lands: before tracing, or inside torch's lazy imports and exporter, which once turned it into
    a traceback and exit status 1 (an interrupted `import torch._dynamo`, then torch's own AttributeError)."""
    p = subprocess.Popen([*CLI, "export", "--model", "digits", "--steps", "10", "--out", str(tmp_path / "b")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert _wait_for(lambda: list(tmp_path.glob(".b.vpsde-tmp-*")))
    time.sleep(delay)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=120) == 143
    err = p.stderr.read()
    assert err.rstrip().endswith("terminated") and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_nothing_is_committed_once_the_process_is_stopping(tmp_path):
    """The second line of the SIGTERM handling: code the signal lands in may swallow it; the commit refuses."""
    target = tmp_path / "d"
    (target / "old").mkdir(parents=True)
    STOPPING.set()
    try:
        with pytest.raises(Stopped):
            with atomic_path(tmp_path / "f.npy") as tmp:
                tmp.write_bytes(b"complete")
        with pytest.raises(Stopped):
            with atomic_dir(target) as tmp:
                (tmp / "new").write_bytes(b"complete")
                replace_dir(tmp, target)
    finally:
        STOPPING.clear()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"] and [p.name for p in target.iterdir()] == ["old"]
    with atomic_path(tmp_path / "f.npy") as tmp:  # cleared: commits again
        tmp.write_bytes(b"complete")
    assert (tmp_path / "f.npy").read_bytes() == b"complete"


def test_a_stale_output_temporary_is_swept_and_a_live_one_is_kept(gmm_bundle, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    # a writer that died holding its temporary (SIGKILL: no cleanup ran)
    code = ("import os, signal, sys\nfrom vpsde.runtime.atomic import atomic_path\n"
            f"with atomic_path({str(out / 'samples.npz')!r}, suffix='.tmp.npz') as tmp:\n"
            "    tmp.write_bytes(b'half')\n    os.kill(os.getpid(), signal.SIGKILL)\n")
    subprocess.run([sys.executable, "-c", code], timeout=60)
    assert len(_debris(out)) == 1
    with atomic_path(out / "samples.npz", suffix=".tmp.npz") as live:  # a live writer's temporary
        assert sweep_stale(out, "samples.npz") == [] and live.exists()
        assert main(["sample", str(gmm_bundle.root), "--num", "2", "--no-progress", "--out", str(out)]) == 0
        assert _debris(out) == [live.name]  # the dead writer's is gone, the live one kept
        live.write_bytes(b"done")
    assert _debris(out) == []


# -- what can fail is checked before the first graph call --------------------------------------------------
class NaNModel(ScoreModel):
    """NaN from the first step: if sampling ran before a check, the NaN error would come first."""

    sample_shape = (2,)
    name = "nan"

    def forward(self, x, t):
        return x * float("nan")


@pytest.fixture(scope="module")
def nan_bundle(tmp_path_factory):
    return export_bundle(NaNModel(), tmp_path_factory.mktemp("nan") / "nan", steps=5, grid="uniform", sde=VPSDE(),
                         log=lambda _: None)


def test_bad_out_fails_before_sampling_python(nan_bundle, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["sample", str(nan_bundle.root), "--num", "2", "--out", str(tmp_path / "file")]) == 2
    err = capsys.readouterr().err
    assert "is not a directory" in err and "NaN" not in err


def test_bad_out_fails_before_sampling_cpp(host, nan_bundle, tmp_path):
    for out, expect in ((tmp_path, "is a directory"), (tmp_path / "no" / "x.npy", "does not exist")):
        r = run_host(host / "vpsde-sample", nan_bundle.root, "--num", 2, "--seed", 0, "--out", out)
        assert r.returncode == 2 and expect in r.stderr and "NaN" not in r.stderr, r.stderr


def test_a_failed_run_removes_the_empty_out_it_created_and_nothing_else(nan_bundle, tmp_path, capsys):
    """--out is created (and proved writable) before sampling; a run that then fails (here NaN at step 0) left it
    behind empty. The directories the command created are removed if still empty; a directory that existed, or
    that holds anything, stays."""
    out = tmp_path / "new" / "deeper"
    assert main(["sample", str(nan_bundle.root), "--num", "2", "--no-progress", "--out", str(out)]) == 2
    assert "NaN" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # both levels it created are gone
    existing = tmp_path / "existing"
    existing.mkdir()
    assert main(["sample", str(nan_bundle.root), "--num", "2", "--no-progress", "--out", str(existing / "o")]) == 2
    assert list(tmp_path.iterdir()) == [existing] and list(existing.iterdir()) == []
    kept = existing / "kept"
    kept.mkdir()
    (kept / "mine.txt").write_text("not vpsde's")
    assert main(["sample", str(nan_bundle.root), "--num", "2", "--no-progress", "--out", str(kept)]) == 2
    assert (kept / "mine.txt").read_text() == "not vpsde's" and len(list(kept.iterdir())) == 1


def test_first_sample_beyond_int64_is_valid(gmm_bundle, tmp_path):
    """--first-sample 2^63 is a valid index (< 2^64): it samples and records it (it used to fail after
    sampling, in np.int64)."""
    first = 2**63 + 5
    assert main(["sample", str(gmm_bundle.root), "--num", "2", "--first-sample", str(first), "--no-progress",
                 "--out", str(tmp_path)]) == 0
    z = np.load(tmp_path / "samples.npz")
    assert int(z["first_sample"]) == first
    np.testing.assert_array_equal(z["samples"], Sampler(gmm_bundle, progress=False).sample(2, seed=0, first_sample=first))


def test_sigterm_during_cpp_sampling_leaves_no_temporary(host, tmp_path):
    bundle = export_bundle(load_model("digits", VPSDE()), tmp_path / "d", steps=1000, log=lambda _: None)
    out = tmp_path / "out"
    out.mkdir()
    p = subprocess.Popen([str(host / "vpsde-sample"), str(bundle.root), "--num", "64", "--seed", "0", "--threads", "1",
                          "--out", str(out / "x.npy")], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert _wait_for(lambda: list(out.glob(".x.npy.vpsde-tmp-*")))  # the output is opened before sampling
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=60) == 143
    assert list(out.iterdir()) == []


# -- a full disk and a read-only file system -------------------------------------------------------------
def _in_tmpfs(script: str, size: str = "1m") -> subprocess.CompletedProcess:
    """Run ``script`` (bash) with a fresh tmpfs of ``size`` mounted at $T in a private mount namespace."""
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("no mount namespaces here (unshare -m failed): cannot mount a small tmpfs for the full-disk test")
    wrapped = f"set -e; T=$(mktemp -d); mount -t tmpfs -o size={size} tmpfs $T; cd $T; {script}"
    return subprocess.run(["unshare", "-m", "bash", "-c", wrapped], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PY": sys.executable})


def test_disk_full_during_export_is_one_line_and_leaves_nothing():
    r = _in_tmpfs('set +e; $PY -m vpsde.cli.main export --model digits --steps 10 --out $T/b; echo "rc=$?"; ls -A $T')
    assert "rc=2" in r.stdout, r.stdout + r.stderr
    assert "No space left on device" in r.stderr and "Traceback" not in r.stderr
    assert re.search(r"error: /\S+/b(/\S*)?: No space left on device", r.stderr), r.stderr  # names --out, not "a file"
    assert r.stdout.strip().splitlines()[-1] == "rc=2"  # ls printed nothing: no debris


def test_disk_full_during_sample_is_one_line_and_leaves_nothing(gmm_bundle):
    r = _in_tmpfs(f'head -c 1000000 /dev/zero > $T/fill 2>/dev/null || true; set +e; '
                  f'$PY -m vpsde.cli.main sample {gmm_bundle.root} --num 20000 --no-progress --out $T/o; echo "rc=$?"; '
                  f'ls -A $T/o')
    assert "rc=2" in r.stdout and "No space left on device" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert re.search(r"error: /\S+/o/\S+: No space left on device", r.stderr), r.stderr  # the file in --out
    assert r.stdout.strip().splitlines()[-1] == "rc=2"


def test_disk_full_in_cpp_is_exit_2_and_leaves_nothing(host, gmm_bundle):
    r = _in_tmpfs(f'head -c 1000000 /dev/zero > $T/fill 2>/dev/null || true; set +e; '
                  f'{host}/vpsde-sample {gmm_bundle.root} --num 20000 --seed 0 --out $T/x.npy; echo "rc=$?"; ls -A $T')
    assert "rc=2" in r.stdout and "No space left on device" in r.stderr, r.stdout + r.stderr
    assert r.stdout.split() == ["rc=2", "fill"]  # no temporary left beside the filler


def test_read_only_bundle_for_build_and_out_for_sample_are_one_line(gmm_bundle):
    r = _in_tmpfs(f'cp -r {gmm_bundle.root} $T/b; rm -rf $T/b/engines; mkdir $T/o; mount -o remount,ro $T; set +e; '
                  f'$PY -m vpsde.cli.main build $T/b --batch 2 --target-cc SM86; echo "rc=$?"; '
                  f'$PY -m vpsde.cli.main sample $T/b --num 2 --out $T/o; echo "rc=$?"')
    assert [line for line in r.stdout.split() if line.startswith("rc=")] == ["rc=2", "rc=2"], r.stdout + r.stderr
    lines = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(lines) == 2 and all("Read-only file system" in line for line in lines), r.stderr
    assert lines[0].startswith("vpsde build: error:") and "/b/engines" in lines[0]
    assert lines[1].startswith("vpsde sample: error:") and "/o: Read-only file system" in lines[1]  # names --out
    assert "Traceback" not in r.stderr
