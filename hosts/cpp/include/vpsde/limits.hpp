/// @file
/// What this process may use: the machine's memory and CPUs, or less where a cgroup caps them (a container's
/// limits, a systemd slice's) or the CPU affinity narrows them. The same files as vpsde/runtime/limits.py reads.
#pragma once

#include <string>

namespace vpsde {

/// Where the cgroup files are read: this process's cgroup list and the mount point of the hierarchies (v2 at the
/// root or at unified/, v1's controllers at memory/ and cpu/). Tests point them at a fake tree.
struct CgroupPaths {
  std::string proc_cgroup = "/proc/self/cgroup";
  std::string root = "/sys/fs/cgroup";
};

/// Bytes of memory: the smallest of the physical memory and every cgroup memory limit on this process's cgroup
/// path (v1 memory.limit_in_bytes, v2 memory.max); 0 where nothing says. `file` names the cgroup file that set
/// it ("" for the machine's memory).
long double memory_limit(std::string& file, const CgroupPaths& where = {});

/// The CPUs this process may keep busy, >= 1: those its affinity allows, or fewer where a cgroup CPU quota on its
/// path is lower (v1 cpu.cfs_quota_us / cpu.cfs_period_us, v2 cpu.max; a fraction rounds up).
int cpu_limit(const CgroupPaths& where = {});

/// Intra-op threads when none are given: cpu_limit() where it is below the machine's CPU count, else 0 (ONNX
/// Runtime's own default, which sizes its pool by the machine).
int default_threads();

}  // namespace vpsde
