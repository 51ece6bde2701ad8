"""How much memory this process may use: the machine's physical memory, or less where a cgroup caps it (a
container's limit, a systemd slice's MemoryMax). The C++ host (hosts/cpp/src/sampler.cpp) reads the same files."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import NamedTuple

CGROUP_ROOT = Path("/sys/fs/cgroup")
"""Where cgroup hierarchies are mounted: v2 at the root (or at ``unified/`` on a hybrid host), v1's memory
controller at ``memory/``."""


class MemoryLimit(NamedTuple):
    bytes: int
    file: Path | None
    """The cgroup file that sets it; None: the machine's physical memory."""

    def __str__(self) -> str:
        gib = f"{self.bytes / 2**30:.1f} GiB"
        return f"this machine's {gib}" if self.file is None else f"the {gib} its cgroup allows ({self.file})"


def memory_limit(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = CGROUP_ROOT) -> MemoryLimit | None:
    """The smallest of the physical memory and every cgroup memory limit on this process's cgroup path (its own
    and each ancestor's, v1 ``memory.limit_in_bytes`` and v2 ``memory.max``); None where nothing says."""
    limits = []
    try:
        limits.append(MemoryLimit(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), None))
    except (ValueError, OSError, AttributeError):
        pass
    limits += [MemoryLimit(n, f) for f, n in _cgroup_limits(proc_cgroup, root)]
    return min(limits, default=None, key=lambda limit: limit.bytes)


def _cgroup_limits(proc_cgroup: Path, root: Path) -> list[tuple[Path, int]]:
    """(file, bytes) of each memory limit set on this process's cgroup path. Each directory from the hierarchy's
    mount point down the process's path is read: inside a container the path may name the host's hierarchy,
    and the container's own limit is then the mount point's."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":
            mounts, name = (root, root / "unified"), "memory.max"
        elif "memory" in controllers.split(","):
            mounts, name = (root / "memory",), "memory.limit_in_bytes"
        else:
            continue
        parts = PurePosixPath(path).parts[1:]
        for mount in mounts:
            for depth in range(len(parts) + 1):
                file = mount.joinpath(*parts[:depth], name)
                try:
                    found.append((file, int(file.read_text().strip())))  # "max" (v2: no limit) is not a number
                except (OSError, ValueError):
                    continue
    return found
