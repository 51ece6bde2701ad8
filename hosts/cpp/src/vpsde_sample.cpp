// vpsde-sample BUNDLE --num N [--seed S] [--batch B] [--first-sample K] [--provider cpu|cuda|tensorrt]
//              [--threads T] [--no-nan-guard] [--expect-digest SHA256] --out samples.npy
// vpsde-sample BUNDLE --data POINTS_OR_IMAGES.npy [--seed S] [--batch B] [--first-sample K] ... --out logp.npy
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <map>
#include <new>
#include <stdexcept>
#include <string>

#include "vpsde/dequantize.hpp"
#include "vpsde/limits.hpp"
#include "vpsde/npy.hpp"
#include "vpsde/sampler.hpp"

namespace {

const char* kUsage =
    "usage: vpsde-sample BUNDLE --num N [--seed S] [--batch B] [--first-sample K]\n"
    "                    [--provider cpu|cuda|tensorrt] [--threads T] [--no-nan-guard] [--cond NAME=FILE.npy ...]\n"
    "                    [--expect-digest SHA256] [--device-id N] [--verbose] [--version] --out samples.npy\n"
    "Runs the bundle's timestep loop on ONNX Runtime with the portable Philox noise and writes the final\n"
    "samples (float32 [N, *sample_shape]) as .npy. Defaults: --seed 0, --batch 64 on the CPU (N on a GPU),\n"
    "--first-sample 0, --provider cpu, --threads: the CPUs this process may use (affinity, a cgroup quota) where\n"
    "they are fewer than the machine's, else ONNX Runtime's default.\n"
    "--cond gives a conditioning input the bundle names (inpainting: --cond known=k.npy --cond mask=m.npy),\n"
    "float32 [*sample_shape] (shared) or [N, *sample_shape].\n"
    "--expect-digest refuses a bundle whose digest (sha256 of its SHA256SUMS; `vpsde inspect` prints it) differs.\n"
    "A likelihood bundle (vpsde export --sampler likelihood): --data POINTS.npy instead of --num, float32 or\n"
    "float64 points [N, *sample_shape] in the model's space (float64 rounded to float32, as `vpsde likelihood`) or uint8 images [N, *sample_shape] (dequantized with noise call 0 of\n"
    "each input's sample index into the bundle's model.value_range, as `vpsde likelihood`); writes log p in nats,\n"
    "float64 [N], to --out.\n";

constexpr std::uint64_t kMaxNum = std::uint64_t{1} << 40;

std::uint64_t parse_u64(const std::string& flag, const std::string& v, std::uint64_t lo = 0,
                        std::uint64_t hi = UINT64_MAX) {
  std::uint64_t x = 0;
  try {
    std::size_t pos = 0;
    if (v.empty() || v[0] == '-' || v[0] == '+' || v[0] == ' ') throw std::invalid_argument("sign");
    x = std::stoull(v, &pos, 0);
    if (pos != v.size()) throw std::invalid_argument("trailing");
  } catch (const std::exception&) {
    throw vpsde::Error(flag + ": expected a non-negative integer, got '" + v + "'");
  }
  if (x < lo || x > hi)
    throw vpsde::Error(flag + ": expected " + std::to_string(lo) + ".." + std::to_string(hi) + ", got " + v);
  return x;
}

// A message for the terminal: control characters and non-ASCII bytes (e.g. from a hostile manifest) escaped.
std::string printable(const std::string& s) {
  std::string out;
  for (unsigned char c : s) {
    if (c == '\n' || (c >= 0x20 && c < 0x7f)) {
      out += static_cast<char>(c);
    } else {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    }
  }
  return out;
}

// SIGTERM / SIGINT: remove the output's temporary (async-signal-safe), then exit like the Python CLI.
extern "C" void on_signal(int sig) {
  const char* tmp = vpsde::pending_temporary();
  if (tmp[0]) ::unlink(tmp);
  ::_exit(sig == SIGTERM ? 143 : 130);
}

}  // namespace

int main(int argc, char** argv) {
  std::signal(SIGTERM, on_signal);
  std::signal(SIGINT, on_signal);
  try {
    std::string bundle, out, provider = "cpu", expect_digest;
    std::int64_t num = 0, batch = 0;
    std::uint64_t seed = 0, first = 0;
    int threads = 0, device_id = 0;
    bool nan_guard = true, verbose = false;
    std::map<std::string, vpsde::NpyArray> cond;
    std::string data_path;
    for (int i = 1; i < argc; ++i) {
      const std::string a = argv[i];
      auto value = [&]() -> std::string {
        if (i + 1 >= argc) throw vpsde::Error(a + ": expected a value");
        return argv[++i];
      };
      if (a == "-h" || a == "--help") {
        std::cout << kUsage;
        return 0;
      } else if (a == "--version") {
        std::cout << "vpsde-sample " << vpsde::version() << " (ONNX Runtime " << Ort::GetVersionString() << ")\n";
        return 0;
      } else if (a == "--num") num = static_cast<std::int64_t>(parse_u64(a, value(), 1, kMaxNum));
      else if (a == "--seed") seed = parse_u64(a, value());  // default 0, as `vpsde sample`
      else if (a == "--batch") batch = static_cast<std::int64_t>(parse_u64(a, value(), 1, kMaxNum));
      else if (a == "--first-sample") first = parse_u64(a, value());
      else if (a == "--provider") provider = value();
      else if (a == "--threads") threads = static_cast<int>(parse_u64(a, value(), 1, vpsde::kMaxThreads));
      else if (a == "--expect-digest") {
        expect_digest = value();
        const bool hex = expect_digest.size() == 64 &&
                         expect_digest.find_first_not_of("0123456789abcdef") == std::string::npos;
        if (!hex) throw vpsde::Error("--expect-digest: expected 64 lower-case hex digits, got '" + expect_digest + "'");
      }
      else if (a == "--out") out = value();
      else if (a == "--data") data_path = value();
      else if (a == "--no-nan-guard") nan_guard = false;
      else if (a == "--verbose") verbose = true;
      else if (a == "--device-id") device_id = static_cast<int>(parse_u64(a, value(), 0, 1024));
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
    vpsde::NpyArray data;
    vpsde::NpyPixels pixels;
    std::vector<std::int64_t> data_shape;
    const std::string descr = data_path.empty() ? "" : vpsde::npy_descr(data_path);
    const bool images = descr == "|u1";
    if (!data_path.empty()) {
      if (descr != "<f4" && descr != "<f8" && !images)
        throw vpsde::Error(data_path + ": expected float32 or float64 points ('<f4', '<f8') or uint8 images ('|u1'), "
                           "got '" + descr + "'");
      if (num > 0) throw vpsde::Error("--data and --num: give one (the data's rows are the inputs)");
      if (!cond.empty()) throw vpsde::Error("--data and --cond: a likelihood bundle takes no conditioning");
      if (images) pixels = vpsde::load_npy_pixels(data_path);
      else data = vpsde::load_npy_points(data_path);
      data_shape = images ? pixels.shape : data.shape;
      if (data_shape.empty() || data_shape[0] < 1)
        throw vpsde::Error(data_path + ": expected points [N >= 1, *sample_shape]");
      num = data_shape[0];
    }
    if (bundle.empty() || out.empty() || num < 1)
      throw vpsde::Error(std::string("BUNDLE, --num (>= 1) or --data, and --out are required\n") + kUsage);
    if (first > UINT64_MAX - static_cast<std::uint64_t>(num - 1))
      throw vpsde::Error("--first-sample " + std::to_string(first) + " + --num " + std::to_string(num) +
                         " passes the last sample index 2^64 - 1");
    vpsde::SamplerOptions options;
    options.provider = provider;
    options.threads = threads;
    const int used_threads = threads > 0 ? threads : vpsde::default_threads();  // what the sessions get
    const std::string threads_text = provider != "cpu" || used_threads == 0 ? std::string() :
        ", " + std::to_string(used_threads) + (used_threads == 1 ? " thread" : " threads");
    options.nan_guard = nan_guard;
    options.expect_digest = expect_digest;
    options.device_id = device_id;
    options.verbose = verbose;
    vpsde::Sampler sampler(bundle, options);
    vpsde::AtomicFile file(out);  // before any graph call: a bad --out must not cost a sampling run
    const auto t0 = std::chrono::steady_clock::now();
    if (batch == 0) batch = provider == "cpu" ? std::min<std::int64_t>(num, 64) : num;  // as the Python CLI
    std::vector<std::int64_t> shape{num};
    for (auto s : sampler.manifest().sample_shape) shape.push_back(s);
    if (!data_path.empty()) {
      const auto& m = sampler.manifest();
      if (data_shape != shape) {
        std::string want = "[N";
        for (auto s : m.sample_shape) want += ", " + std::to_string(s);
        throw vpsde::Error(data_path + ": expected " + (images ? "uint8 images " : "points ") + want +
                           "] for this bundle");
      }
      if (images && m.value_range.empty())
        throw vpsde::Error(data_path + ": images need the model's value range, and this bundle has none "
                           "(model.value_range is null): pass real-valued points as a float .npy");
      if (images) data.data = vpsde::dequantize(pixels.data.data(), num, m.sample_numel(), m.value_range[0],
                                                m.value_range[1], seed, first);
      const std::vector<double> logp = sampler.log_likelihood(data.data.data(), num, seed, batch, first);
      const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      vpsde::write_npy(file, logp, {num});
      std::cerr << "scored " << num << " in " << secs << " s (" << sampler.manifest().steps << " steps, " << provider
                << threads_text << ")\n";
      std::cout << out << "\n";
      return 0;
    }
    const std::vector<float> x = sampler.sample(num, seed, batch, first, cond);
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    vpsde::write_npy(file, x, shape);
    std::cerr << "sampled " << num << " in " << secs << " s (" << sampler.manifest().steps << " steps, " << provider
              << threads_text << ")\n";
    std::cout << out << "\n";
    return 0;
  } catch (const vpsde::Error& e) {
    std::cerr << "vpsde-sample: error: " << printable(e.what()) << "\n";
    return 2;
  } catch (const std::bad_alloc&) {
    std::cerr << "vpsde-sample: error: out of memory: use a smaller --num or --batch\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "vpsde-sample: error: " << printable(e.what()) << "\n";
    return 2;
  }
}
