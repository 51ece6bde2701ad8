// vpsde-limits-probe PROC_CGROUP ROOT: what vpsde::memory_limit and vpsde::cpu_limit read from a cgroup tree
// (tests/test_limits.py feeds both hosts the same fake trees), as one JSON line: {"memory": bytes, "file": "...",
// "cpus": n}.
#include <cmath>
#include <iostream>

#include <nlohmann/json.hpp>

#include "vpsde/limits.hpp"

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: vpsde-limits-probe PROC_CGROUP ROOT\n";
    return 2;
  }
  const vpsde::CgroupPaths where{argv[1], argv[2]};
  std::string file;
  const long double memory = vpsde::memory_limit(file, where);
  std::cout << nlohmann::json{{"memory", std::llround(memory)}, {"file", file}, {"cpus", vpsde::cpu_limit(where)}}
            << "\n";
  return 0;
}
