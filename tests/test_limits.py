"""What a process may use, read by both hosts. Memory: a request that cannot fit is refused before the first
graph call, against the machine's memory or a cgroup's limit below it (a container's, a systemd slice's); before
0.5.13 both read the physical memory alone, so in a container with a 4 GiB limit on a large node a 20 GiB request
started, and the kernel killed it, without a word, once its result grew past the limit. CPUs: with no --threads,
the intra-op pool is sized by the CPUs the affinity and a cgroup quota allow where they are fewer than the
machine's; before, ONNX Runtime sized it by the machine, and under a 1-CPU quota on 2 cores a digits EM step at
batch 16 took 15.3 ms instead of 11.3 (Python) and the C++ host 14.1 s instead of 11.1 for 1000 steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import NamedTuple

import pytest

from vpsde.runtime.limits import MemoryLimit, cpu_limit, memory_limit

from conftest import run_host

V1_MEMORY, V1_CPU = Path("/sys/fs/cgroup/memory"), Path("/sys/fs/cgroup/cpu")


def _tree(tmp_path: Path, proc_cgroup: str, files: dict[str, str]) -> tuple[Path, Path]:
    """A fake /proc/self/cgroup and cgroup mount tree under ``tmp_path``."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "cgroup").write_text(proc_cgroup)
    root = tmp_path / "fs"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return tmp_path / "cgroup", root


class Limits(NamedTuple):
    memory: MemoryLimit
    cpus: int


@pytest.fixture(params=["python", "cpp"])
def limits_of(request):
    """(fake /proc/self/cgroup, fake mount root) -> Limits, as one host reads them: the Python runtime's functions,
    or the C++ library's through vpsde-limits-probe. Every fake tree goes through both; they must agree."""
    if request.param == "python":
        return lambda proc, root: Limits(memory_limit(proc, root), cpu_limit(proc, root))
    probe = request.getfixturevalue("host") / "vpsde-limits-probe"

    def read(proc: Path, root: Path) -> Limits:
        r = run_host(probe, proc, root)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        return Limits(MemoryLimit(out["memory"], Path(out["file"]) if out["file"] else None), out["cpus"])
    return read


def test_the_tightest_cgroup_limit_on_the_path_wins(tmp_path, limits_of):
    """v2: the process's own cgroup says "max" (no limit), its parent 3 GiB, the slice above 5 GiB."""
    proc, root = _tree(tmp_path, "0::/kubepods/pod1/app\n", {
        "kubepods/memory.max": str(5 << 30), "kubepods/pod1/memory.max": str(3 << 30),
        "kubepods/pod1/app/memory.max": "max\n"})
    limit = limits_of(proc, root).memory
    assert limit == MemoryLimit(3 << 30, root / "kubepods/pod1/memory.max")
    assert str(limit) == f"the 3.0 GiB its cgroup allows ({root / 'kubepods/pod1/memory.max'})"


def test_a_container_whose_cgroup_path_names_the_hosts_hierarchy_reads_its_mount_point(tmp_path, limits_of):
    """v1 without a cgroup namespace: /proc/self/cgroup says /docker/abc, which does not exist inside the
    container; the container's limit is the mount point's. v2 on a hybrid host mounts at unified/."""
    proc, root = _tree(tmp_path, "7:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n0::/docker/abc\n", {
        "memory/memory.limit_in_bytes": str(2 << 30), "unified/memory.max": str(6 << 30)})
    assert limits_of(proc, root).memory == MemoryLimit(2 << 30, root / "memory/memory.limit_in_bytes")
    proc, root = _tree(tmp_path / "hybrid", "4:memory:/docker/abc\n0::/docker/abc\n", {
        "memory/memory.limit_in_bytes": "9223372036854771712", "unified/memory.max": str(6 << 30)})
    assert limits_of(proc, root).memory == MemoryLimit(6 << 30, root / "unified/memory.max")


def test_no_cgroup_limit_is_the_machines_memory(tmp_path, limits_of):
    """v1's "no limit" is a huge number, v2's is "max"; an unreadable /proc/self/cgroup is no limit either."""
    proc, root = _tree(tmp_path, "4:memory:/\n0::/\n", {
        "memory/memory.limit_in_bytes": "9223372036854771712", "memory.max": "max"})
    machine = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert limits_of(proc, root).memory == MemoryLimit(machine, None)
    assert limits_of(tmp_path / "absent", root).memory == MemoryLimit(machine, None)
    assert str(limits_of(proc, root).memory).startswith("this machine's ")


def test_the_tightest_cpu_quota_on_the_path_wins_and_a_fraction_rounds_up(tmp_path, limits_of):
    """v2 "150000 100000" (1.5 CPUs) under a parent's "max 100000" (no quota): 2, or the affinity where lower.
    v1 on a host that mounts cpu and cpuacct together: "-1" is no quota, 50000 / 100000 is half a CPU: 1."""
    affinity = len(os.sched_getaffinity(0))
    proc, root = _tree(tmp_path / "v2", "0::/pod/app\n", {"pod/cpu.max": "max 100000", "pod/app/cpu.max": "150000 100000"})
    assert limits_of(proc, root).cpus == min(2, affinity)
    proc, root = _tree(tmp_path / "v1", "3:cpuacct,cpu:/docker/abc\n", {
        "cpu,cpuacct/cpu.cfs_quota_us": "-1", "cpu,cpuacct/cpu.cfs_period_us": "100000",
        "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "50000", "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000"})
    assert limits_of(proc, root).cpus == 1
    proc, root = _tree(tmp_path / "none", "0::/\n", {"cpu.max": "max 100000"})
    assert limits_of(proc, root).cpus == affinity


@pytest.fixture
def limited_cgroup():
    """A v1 memory cgroup limited to 1 GiB, removed afterwards; commands run in it through ``in_cgroup``."""
    if not (V1_MEMORY / "cgroup.procs").exists() or not os.access(V1_MEMORY, os.W_OK):
        pytest.skip("needs a writable cgroup v1 memory hierarchy at /sys/fs/cgroup/memory (root, no read-only mount)")
    group = V1_MEMORY / f"vpsde-test-{uuid.uuid4().hex[:8]}"
    try:
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(1 << 30))
    except OSError as e:
        if group.exists():
            group.rmdir()
        pytest.skip(f"cannot make a limited memory cgroup here: {e}")
    yield group
    group.rmdir()  # the commands run in it have exited: it is empty


def run_in(group: Path, *argv) -> subprocess.CompletedProcess:
    """``argv`` run inside cgroup ``group`` (the shell moves itself in, then becomes the command)."""
    return subprocess.run(["bash", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "_", *map(str, argv)],
                          capture_output=True, text=True, timeout=120)


def test_both_hosts_refuse_a_request_past_their_cgroups_limit(limited_cgroup, gmm_bundle, host, tmp_path):
    """300 M two-dimensional samples need about 2.2 GiB: within the machine, past the 1 GiB cgroup; both hosts
    refuse it naming the cgroup's file, exit 2, and a small request in the same cgroup runs."""
    limit_file = limited_cgroup / "memory.limit_in_bytes"
    python = run_in(limited_cgroup, sys.executable, "-m", "vpsde.cli.main", "sample", gmm_bundle.root, "--num",
                    300_000_000, "--out", tmp_path / "py", "--no-progress")
    assert python.returncode == 2 and f"the 1.0 GiB its cgroup allows ({limit_file})" in python.stderr, python.stderr
    assert not (tmp_path / "py").exists()
    cpp = run_in(limited_cgroup, host / "vpsde-sample", gmm_bundle.root, "--num", 300_000_000, "--out",
                 tmp_path / "x.npy")
    assert cpp.returncode == 2 and f"the 1.0 GiB its cgroup allows ({limit_file})" in cpp.stderr, cpp.stderr
    small = run_in(limited_cgroup, host / "vpsde-sample", gmm_bundle.root, "--num", 3, "--out", tmp_path / "x.npy")
    assert small.returncode == 0 and (tmp_path / "x.npy").exists(), small.stderr


@pytest.fixture
def cpu_quota_cgroup():
    """A v1 cpu cgroup with a quota of one CPU (100000 of every 100000 us), removed afterwards."""
    if not (V1_CPU / "cgroup.procs").exists() or not os.access(V1_CPU, os.W_OK):
        pytest.skip("needs a writable cgroup v1 cpu hierarchy at /sys/fs/cgroup/cpu (root, no read-only mount)")
    if (os.cpu_count() or 1) < 2:
        pytest.skip("a one-CPU machine: a one-CPU quota changes nothing")
    group = V1_CPU / f"vpsde-test-{uuid.uuid4().hex[:8]}"
    try:
        group.mkdir()
        (group / "cpu.cfs_quota_us").write_text("100000")
    except OSError as e:
        if group.exists():
            group.rmdir()
        pytest.skip(f"cannot make a cpu cgroup with a quota here: {e}")
    yield group
    group.rmdir()


def test_both_hosts_size_their_thread_pool_by_a_cpu_quota(cpu_quota_cgroup, gmm_bundle, host, tmp_path):
    """Under a one-CPU quota both hosts run one intra-op thread when not told otherwise (the C++ host says so in
    its summary line; vpsde doctor shows the Python default), and --threads still wins."""
    doctor = run_in(cpu_quota_cgroup, sys.executable, "-m", "vpsde.cli.main", "doctor")
    assert doctor.returncode == 0 and f"1 of {os.cpu_count()} CPUs usable" in doctor.stdout, doctor.stdout
    assert "default intra-op threads 1;" in doctor.stdout, doctor.stdout
    cpp = run_in(cpu_quota_cgroup, host / "vpsde-sample", gmm_bundle.root, "--num", 3, "--out", tmp_path / "x.npy")
    assert cpp.returncode == 0 and ", cpu, 1 thread)" in cpp.stderr, cpp.stderr
    cpp = run_in(cpu_quota_cgroup, host / "vpsde-sample", gmm_bundle.root, "--num", 3, "--threads", 2, "--out",
                 tmp_path / "x.npy")
    assert cpp.returncode == 0 and ", cpu, 2 threads)" in cpp.stderr, cpp.stderr
