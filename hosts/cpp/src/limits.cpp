#include "vpsde/limits.hpp"

#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>
#include <vector>

namespace vpsde {
namespace {

namespace fs = std::filesystem;

// Calls `visit(file, text)` for each limit file `v1_name` (the v1 hierarchy of `controller`) or `v2_name` (v2) on
// this process's cgroup path, from each hierarchy's mount point down: inside a container the path may name the
// host's hierarchy, and the container's own limit is then the mount point's.
void cgroup_files(const CgroupPaths& where, const std::string& controller, const std::string& v1_name,
                  const std::string& v2_name, const std::function<void(const fs::path&, const std::string&)>& visit) {
  const fs::path root = where.root;
  std::ifstream cgroups(where.proc_cgroup);
  for (std::string line; std::getline(cgroups, line);) {
    const auto first = line.find(':'), second = first == std::string::npos ? first : line.find(':', first + 1);
    if (second == std::string::npos) continue;
    std::string controllers = line.substr(first + 1, second - first - 1);
    const std::string path = line.substr(second + 1);
    std::vector<fs::path> mounts;
    std::string name;
    if (controllers.empty()) {
      mounts = {root, root / "unified"};
      name = v2_name;
    } else if (("," + controllers + ",").find("," + controller + ",") != std::string::npos) {
      std::vector<std::string> names;
      std::stringstream split(controllers);
      for (std::string c; std::getline(split, c, ',');) names.push_back(c);
      std::sort(names.begin(), names.end());
      std::string joined;
      for (const auto& c : names) joined += (joined.empty() ? "" : ",") + c;
      mounts = {root / controller};
      if (joined != controller) mounts.push_back(root / joined);
      name = v1_name;
    } else {
      continue;
    }
    for (const auto& mount : mounts) {
      fs::path dir = mount;
      std::vector<fs::path> dirs{dir};
      for (const auto& part : fs::path(path).relative_path()) dirs.push_back(dir /= part);
      for (const auto& d : dirs) {
        std::ifstream in(d / name);
        std::string text;
        if (in && std::getline(in, text)) visit(d / name, text);
      }
    }
  }
}

}  // namespace

long double memory_limit(std::string& file, const CgroupPaths& where) {
  long double have = 0;
  const long pages = ::sysconf(_SC_PHYS_PAGES), page = ::sysconf(_SC_PAGE_SIZE);
  if (pages > 0 && page > 0) have = static_cast<long double>(pages) * page;
  file.clear();
  cgroup_files(where, "memory", "memory.limit_in_bytes", "memory.max", [&](const fs::path& f, const std::string& text) {
    std::istringstream in(text);
    long double value = 0;
    if (in >> value && value > 0 && (have == 0 || value < have)) {  // "max" (v2: no limit) reads as no number
      have = value;
      file = f.string();
    }
  });
  return have;
}

int cpu_limit(const CgroupPaths& where) {
  long cpus = ::sysconf(_SC_NPROCESSORS_ONLN);
  cpu_set_t set;
  if (::sched_getaffinity(0, sizeof(set), &set) == 0) cpus = CPU_COUNT(&set);
  cgroup_files(where, "cpu", "cpu.cfs_quota_us", "cpu.max", [&](const fs::path& f, const std::string& text) {
    long long quota = 0, period = 0;
    std::istringstream in(text);
    if (f.filename() == "cpu.max") {
      if (!(in >> quota >> period)) return;  // "max 100000": no quota
    } else {
      std::ifstream p(f.parent_path() / "cpu.cfs_period_us");
      if (!(in >> quota) || !(p >> period)) return;
    }
    if (quota > 0 && period > 0) cpus = std::min<long>(cpus, static_cast<long>((quota + period - 1) / period));
  });
  return static_cast<int>(std::max<long>(1, cpus));
}

int default_threads() {
  const int cpus = cpu_limit();
  return cpus < ::sysconf(_SC_NPROCESSORS_ONLN) ? cpus : 0;
}

}  // namespace vpsde
