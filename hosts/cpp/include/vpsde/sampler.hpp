// Drives a bundle's timestep loop on ONNX Runtime, like vpsde.runtime.Sampler:
//   x = noise(call 0); state = zeros; for each step, for each graph call of the program: feed x, the step's
//   schedule scalars by input name, one noise call per noise input, the state buffers; x = x_next,
//   state = its outputs; the sample is the manifest's `final` output of the last call.
#pragma once

#include <onnxruntime_cxx_api.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "vpsde/manifest.hpp"
#include "vpsde/npy.hpp"

namespace vpsde {

struct SamplerOptions {
  std::string provider = "cpu";  // cpu | cuda | tensorrt (through ONNX Runtime's execution providers)
  int threads = 0;               // intra-op threads; 0 = ONNX Runtime's default
  bool nan_guard = true;
  std::string expect_digest;  // 64 hex: refuse a bundle of another digest (empty: any)
};

inline constexpr int kMaxThreads = 1024;

// One conditioning input of one batch: its first sample's row, or the one row every sample shares.
struct CondView {
  const float* data = nullptr;
  bool shared = false;
};

class Sampler {
 public:
  Sampler(std::string bundle_dir, SamplerOptions options);
  ~Sampler();  // out of line: Graph is incomplete here
  // Samples first_sample .. first_sample + num - 1 (global indices), `batch` at a time, with the portable
  // Philox noise of `seed`: float32 [num, *sample_shape], row-major.
  // `conditioning` holds the arrays the manifest's sampler.conditioning names, each [*sample_shape] (shared) or
  // [num, *sample_shape].
  std::vector<float> sample(std::int64_t num, std::uint64_t seed, std::int64_t batch, std::uint64_t first_sample = 0,
                            const std::map<std::string, NpyArray>& conditioning = {});
  const Manifest& manifest() const { return manifest_; }

 private:
  struct Graph;  // a session with its buffers and IO binding
  void check_memory(std::int64_t num, std::int64_t batch) const;
  void sample_batch(std::uint64_t seed, std::uint64_t first, std::int64_t size, float* out,
                    const std::map<std::string, CondView>& cond);

  std::string bundle_dir_;
  SamplerOptions options_;
  Manifest manifest_;
  Ort::Env env_;
  std::map<std::string, std::unique_ptr<Graph>> graphs_;
};

}  // namespace vpsde
