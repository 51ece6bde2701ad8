// vpsde-sample BUNDLE --num N --seed S [--batch B] [--first-sample K] [--provider cpu|cuda|tensorrt]
//              [--threads T] [--no-nan-guard] --out samples.npy
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <map>
#include <stdexcept>
#include <string>

#include "vpsde/npy.hpp"
#include "vpsde/sampler.hpp"

namespace {

const char* kUsage =
    "usage: vpsde-sample BUNDLE --num N --seed S [--batch B] [--first-sample K]\n"
    "                    [--provider cpu|cuda|tensorrt] [--threads T] [--no-nan-guard] [--cond NAME=FILE.npy ...]\n"
    "                    --out samples.npy\n"
    "Runs the bundle's timestep loop on ONNX Runtime with the portable Philox noise and writes the final\n"
    "samples (float32 [N, *sample_shape]) as .npy. Defaults: --batch N, --first-sample 0, --provider cpu.\n"
    "--cond gives a conditioning input the bundle names (inpainting: --cond known=k.npy --cond mask=m.npy),\n"
    "float32 [*sample_shape] (shared) or [N, *sample_shape].\n";

std::uint64_t parse_u64(const std::string& flag, const std::string& v) {
  try {
    std::size_t pos = 0;
    if (!v.empty() && v[0] == '-') throw std::invalid_argument("negative");
    const unsigned long long x = std::stoull(v, &pos, 0);
    if (pos != v.size()) throw std::invalid_argument("trailing");
    return x;
  } catch (const std::exception&) {
    throw vpsde::Error(flag + ": expected a non-negative integer, got '" + v + "'");
  }
}

}  // namespace

int main(int argc, char** argv) {
  try {
    std::string bundle, out, provider = "cpu";
    std::int64_t num = 0, batch = 0;
    std::uint64_t seed = 0, first = 0;
    int threads = 0;
    bool nan_guard = true, have_seed = false;
    std::map<std::string, vpsde::NpyArray> cond;
    for (int i = 1; i < argc; ++i) {
      const std::string a = argv[i];
      auto value = [&]() -> std::string {
        if (i + 1 >= argc) throw vpsde::Error(a + ": expected a value");
        return argv[++i];
      };
      if (a == "-h" || a == "--help") {
        std::cout << kUsage;
        return 0;
      } else if (a == "--num") num = static_cast<std::int64_t>(parse_u64(a, value()));
      else if (a == "--seed") seed = parse_u64(a, value()), have_seed = true;
      else if (a == "--batch") batch = static_cast<std::int64_t>(parse_u64(a, value()));
      else if (a == "--first-sample") first = parse_u64(a, value());
      else if (a == "--provider") provider = value();
      else if (a == "--threads") threads = static_cast<int>(parse_u64(a, value()));
      else if (a == "--out") out = value();
      else if (a == "--no-nan-guard") nan_guard = false;
      else if (a == "--cond") {
        const std::string v = value();
        const auto eq = v.find('=');
        if (eq == std::string::npos || eq == 0) throw vpsde::Error("--cond: expected NAME=FILE.npy, got '" + v + "'");
        cond[v.substr(0, eq)] = vpsde::load_npy(v.substr(eq + 1));
      }
      else if (!a.empty() && a[0] == '-') throw vpsde::Error("unknown option " + a + "\n" + kUsage);
      else if (bundle.empty()) bundle = a;
      else throw vpsde::Error("unexpected argument " + a);
    }
    if (bundle.empty() || out.empty() || num < 1 || !have_seed)
      throw vpsde::Error(std::string("BUNDLE, --num (>= 1), --seed and --out are required\n") + kUsage);
    vpsde::Sampler sampler(bundle, {provider, threads, nan_guard});
    const auto t0 = std::chrono::steady_clock::now();
    const std::vector<float> x = sampler.sample(num, seed, batch, first, cond);
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::vector<std::int64_t> shape{num};
    for (auto s : sampler.manifest().sample_shape) shape.push_back(s);
    vpsde::save_npy(out, x, shape);
    std::cerr << "sampled " << num << " in " << secs << " s (" << sampler.manifest().steps << " steps, " << provider << ")\n";
    std::cout << out << "\n";
    return 0;
  } catch (const vpsde::Error& e) {
    std::cerr << "vpsde-sample: error: " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "vpsde-sample: error: " << e.what() << "\n";
    return 1;
  }
}
