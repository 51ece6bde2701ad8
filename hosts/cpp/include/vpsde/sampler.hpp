/// @file
/// Drives a bundle's timestep loop on ONNX Runtime, like vpsde.runtime.Sampler:
///   x = noise(call 0); state = zeros; for each step, for each graph call of the program: feed x, the step's
///   schedule scalars by input name, one noise call per noise input, the state buffers; x = x_next,
///   state = its outputs; the sample is the manifest's `final` output of the last call. A likelihood bundle's
///   program starts from the caller's points instead of noise call 0 (sampler.task "likelihood").
#pragma once

#include <onnxruntime_cxx_api.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "vpsde/manifest.hpp"
#include "vpsde/program.hpp"
#include "vpsde/npy.hpp"

namespace vpsde {

inline constexpr int kMaxThreads = 1024;  ///< the most intra-op threads a Sampler accepts

/// The library's version ("MAJOR.MINOR.PATCH").
const char* version();

/// Thrown by Sampler::sample when the progress callback asks to stop.
struct Cancelled : Error {
  using Error::Error;
};

/// Called after every step of every batch with (step, steps) (0-based step); return false to cancel sampling
/// (Sampler::sample then throws Cancelled and writes nothing more to the output).
using ProgressFn = std::function<bool(int step, int steps)>;

/// How a Sampler opens its sessions.
struct SamplerOptions {
  std::string provider = "cpu";  ///< cpu | cuda | tensorrt (ONNX Runtime's execution providers)
  int threads = 0;               ///< intra-op threads, 1..1024; 0 = default_threads() (limits.hpp)
  bool nan_guard = true;         ///< check every output for NaN/Inf and name the step
  std::string expect_digest;     ///< 64 hex: refuse a bundle of another digest (empty: any)
  int device_id = 0;             ///< GPU for the cuda / tensorrt providers
  bool verbose = false;          ///< let ONNX Runtime log warnings (default: its own logging off, fatal only)
  /// TensorRT provider's engine cache; empty: BUNDLE/engines/ort-trt (the Python runtime's layout).
  std::string trt_engine_cache;
  Ort::Env* env = nullptr;  ///< the caller's Ort::Env to share (must outlive the Sampler); null: the Sampler's own
  /// Called on the session options after vpsde set its own (threads, provider), before the sessions open: the
  /// place for a caller's own provider options or settings.
  std::function<void(Ort::SessionOptions&)> configure_session;
};

/// One conditioning input of one batch: its first sample's row, or the one row every sample shares.
struct CondView {
  const float* data = nullptr;
  bool shared = false;
};

/// Samples from one bundle.
///
/// Thread safety: every public member may be called from several threads on one Sampler; calls to sample()
/// are serialized (they share the sessions' bound buffers). For parallel sampling use one Sampler per thread
/// (they may share one Ort::Env through SamplerOptions::env).
class Sampler {
 public:
  /// Loads and checks the bundle (SHA256SUMS, manifest, graphs; see docs/DESIGN.md "Trust boundary") and opens
  /// one ONNX Runtime session per graph from the checked bytes. Throws Error with a one-line message.
  Sampler(std::string bundle_dir, SamplerOptions options);
  ~Sampler();
  Sampler(const Sampler&) = delete;
  Sampler& operator=(const Sampler&) = delete;

  /// Samples first_sample .. first_sample + num - 1 (global indices), `batch` at a time (0: all at once), with
  /// the portable Philox noise of `seed`: float32 [num, *sample_shape], row-major. Sample s is the same whatever
  /// the batch. `conditioning` holds the arrays the manifest's sampler.conditioning names, each [*sample_shape]
  /// (shared) or [num, *sample_shape].
  std::vector<float> sample(std::int64_t num, std::uint64_t seed, std::int64_t batch, std::uint64_t first_sample = 0,
                            const std::map<std::string, NpyArray>& conditioning = {},
                            const ProgressFn& progress = nullptr);

  /// The same, into the caller's buffer `out` of `capacity` floats (at least num * sample_numel()).
  void sample_into(float* out, std::size_t capacity, std::int64_t num, std::uint64_t seed, std::int64_t batch,
                   std::uint64_t first_sample = 0, const std::map<std::string, NpyArray>& conditioning = {},
                   const ProgressFn& progress = nullptr);

  /// log p in nats of each row of `points` (float32 [num, *sample_shape], row-major, in the model's space) by a
  /// likelihood bundle's program: float64 [num], each row's final output summed in float64 in element order (as
  /// vpsde.runtime.Sampler.log_likelihood). Row i's Hutchinson probes are noise of sample first_sample + i.
  std::vector<double> log_likelihood(const float* points, std::int64_t num, std::uint64_t seed, std::int64_t batch,
                                     std::uint64_t first_sample = 0, const ProgressFn& progress = nullptr);

  /// The checked manifest (sample shape, steps, program, digest).
  const Manifest& manifest() const { return manifest_; }

 private:
  struct Graph;      // a session and its IO binding
  struct Workspace;  // the buffers of one batch size, on the provider's device
  struct Rolling;    // per rolling value: which of its two buffers is current, and whether a graph wrote it
  void check_memory(std::int64_t num, std::int64_t batch) const;
  Workspace& workspace(std::int64_t size);
  void check_task(const std::string& task) const;
  void check_range(std::int64_t num, std::uint64_t first_sample, std::int64_t& batch) const;
  void run_batch(std::uint64_t seed, std::uint64_t first, std::int64_t size, const float* start, float* out,
                 const std::map<std::string, CondView>& cond, const ProgressFn& progress);
  void bind_call(Graph& g, Workspace& ws, const Rolling& roll, int step, bool last_call);
  void run_call(Graph& g, int step);
  void finish_call(Graph& g, Workspace& ws, Rolling& roll, int step, bool last_call);

  std::string bundle_dir_;
  SamplerOptions options_;
  Manifest manifest_;
  Program program_;
  std::unique_ptr<Ort::Env> own_env_;
  std::map<std::string, std::unique_ptr<Graph>> graphs_;
  std::unique_ptr<Ort::Allocator> allocator_;  // device memory for x, state and outputs
  std::unique_ptr<Workspace> ws_;              // destroyed before the allocator and the sessions
  std::mutex mutex_;
};

}  // namespace vpsde
