"""What this process may use: the machine's memory and CPUs, or less where a cgroup caps them (a container's
limits, a systemd slice's) or the CPU affinity narrows them. The C++ host (hosts/cpp/src/limits.cpp) reads the
same files."""

from __future__ import annotations

import math
import os
from pathlib import Path, PurePosixPath
from typing import Iterator, NamedTuple

CGROUP_ROOT = Path("/sys/fs/cgroup")
"""Where cgroup hierarchies are mounted: v2 at the root (or at ``unified/`` on a hybrid host), v1's controllers
at ``memory/`` and ``cpu/``."""
PROC_CGROUP = Path("/proc/self/cgroup")


class MemoryLimit(NamedTuple):
    bytes: int
    file: Path | None
    """The cgroup file that sets it; None: the machine's physical memory."""

    def __str__(self) -> str:
        gib = f"{self.bytes / 2**30:.1f} GiB"
        return f"this machine's {gib}" if self.file is None else f"the {gib} its cgroup allows ({self.file})"


def memory_limit(proc_cgroup: Path = PROC_CGROUP, root: Path = CGROUP_ROOT) -> MemoryLimit | None:
    """The smallest of the physical memory and every cgroup memory limit on this process's cgroup path (v1
    ``memory.limit_in_bytes``, v2 ``memory.max``); None where nothing says."""
    limits = []
    try:
        limits.append(MemoryLimit(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), None))
    except (ValueError, OSError, AttributeError):
        pass
    for file, text in _cgroup_files(proc_cgroup, root, "memory", "memory.limit_in_bytes", "memory.max"):
        try:
            limits.append(MemoryLimit(int(text), file))  # "max" (v2: no limit) is not a number
        except ValueError:
            continue
    return min(limits, default=None, key=lambda limit: limit.bytes)


def cpu_limit(proc_cgroup: Path = PROC_CGROUP, root: Path = CGROUP_ROOT) -> int:
    """The CPUs this process may keep busy, >= 1: those its affinity allows, or fewer where a cgroup CPU quota on
    its path is lower (v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``, v2 ``cpu.max`` "QUOTA PERIOD"; a
    fraction rounds up)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    for file, text in _cgroup_files(proc_cgroup, root, "cpu", "cpu.cfs_quota_us", "cpu.max"):
        try:
            if file.name == "cpu.max":
                quota, period = (int(v) for v in text.split())  # "max 100000": no quota, not two numbers
            else:
                quota, period = int(text), int((file.parent / "cpu.cfs_period_us").read_text())
        except (ValueError, OSError):
            continue
        if quota > 0 and period > 0:
            cpus = min(cpus, math.ceil(quota / period))
    return max(1, cpus)


def default_threads() -> int | None:
    """Intra-op threads for a backend given none: :func:`cpu_limit` where it is below the machine's CPU count (a
    runtime left to itself sizes its pool by the machine, and in a container limited to 2 of 64 CPUs its threads
    then wait on each other), else None (the runtime's own default)."""
    cpus = cpu_limit()
    return cpus if cpus < (os.cpu_count() or 1) else None


def _cgroup_files(proc_cgroup: Path, root: Path, controller: str, v1_name: str,
                  v2_name: str) -> Iterator[tuple[Path, str]]:
    """(file, stripped text) of each limit file ``v1_name`` (``controller``'s v1 hierarchy) or ``v2_name`` (v2) on
    this process's cgroup path, from each hierarchy's mount point down. Inside a container the path may name the
    host's hierarchy, and the container's own limit is then the mount point's."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":
            mounts, name = (root, root / "unified"), v2_name
        elif controller in controllers.split(","):
            mounts, name = (root / controller, root / ",".join(sorted(controllers.split(",")))), v1_name
        else:
            continue
        parts = PurePosixPath(path).parts[1:]
        for mount in dict.fromkeys(mounts):
            for depth in range(len(parts) + 1):
                file = mount.joinpath(*parts[:depth], name)
                try:
                    yield file, file.read_text().strip()
                except OSError:
                    continue
