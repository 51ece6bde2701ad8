/// @file
/// The bundle manifest (schema version 3, the likelihood task; versions 1 and 2 read too), read and checked: errors
/// name the file and the field.
#pragma once

#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

namespace vpsde {

/// A user-facing error: the CLI prints its message and exits non-zero.
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

inline constexpr int kSchemaVersion = 3;  // newest version read; 1 (Euler-Maruyama only) and 2 read too
inline constexpr const char* kPhiloxId = "philox4x32-10/box-muller/v1";
inline constexpr const char* kPrecisions = "fp32 fp16 bf16 int8";  // model.precision values
/// Bounds on what a manifest may ask for (the same as vpsde/runtime/manifest.py).
inline constexpr std::uint64_t kManifestLimit = 64ull << 20;  // bytes of manifest.json
inline constexpr std::uint64_t kSumsLimit = 1ull << 16;       // bytes of SHA256SUMS
inline constexpr std::uint64_t kGraphLimit = 2ull << 30;      // bytes of one graph
inline constexpr int kMaxDepth = 32;                          // JSON nesting
inline constexpr std::int64_t kMaxSteps = 100000, kMaxRepeat = 1000, kMaxCalls = 1000000;
inline constexpr std::int64_t kMaxSampleNumel = std::int64_t{1} << 28;
/// Schedule values go into the graphs as float32: a magnitude at least this (2^128 - 2^103) rounds to Infinity.
inline constexpr double kFloat32Limit = 0x1.ffffffp+127;

struct TensorSpec {
  std::string name, dtype;
  std::vector<std::int64_t> shape;  // -1 for a symbolic dimension (the batch)
};

struct GraphSpec {
  std::string file, sha256;
  std::vector<TensorSpec> inputs, outputs;
};

struct ProgramCall {
  std::string graph;
  int repeat = 1;
};

/// Host-carried state: fed to graph input `input`, replaced by graph output `output` after each call (init zeros).
struct StateSpec {
  std::string input, output;
};

struct Manifest {
  std::vector<std::int64_t> sample_shape;
  std::vector<double> value_range;  // [lo, hi] of the data (images), or empty (model.value_range null or absent)
  std::string precision = "fp32";  // the network's compute precision inside the graphs: fp32 | fp16 | bf16 | int8 (QDQ convs)
  int steps = 0;
  std::vector<ProgramCall> program;
  std::string final_output;
  std::string task = "sample";  // sample: from the prior (noise call 0); likelihood: from the caller's points (schema 3)
  std::map<std::string, std::vector<double>> schedule;  // per-step scalars by graph input name, one value per step
  std::map<std::string, GraphSpec> graphs;
  std::string noise_generator;
  std::vector<std::string> noise_inputs{"noise"};  // each takes the next noise call, in this order
  std::vector<StateSpec> state;
  std::vector<std::string> conditioning;  // per-sample inputs the caller supplies (inpainting: known, mask)
  std::string digest;  // sha256 of SHA256SUMS, which lists manifest.json and every graph file with their sha256

  std::int64_t sample_numel() const;
};

/// Read <bundle>/SHA256SUMS and manifest.json (bytes checked against it, then every field), then every graph file
/// (inside the bundle, a regular file, its sha256); IO shapes vs the sample shape. With `expect_digest` (64 hex),
/// a bundle of another digest is refused.
Manifest load_bundle(const std::string& bundle_dir, const std::string& expect_digest = "");

/// The bytes of graph `key`, read once from inside the bundle and checked against its sha256: hand these to
/// ONNX Runtime, never the path.
std::string read_graph(const std::string& bundle_dir, const std::string& key, const GraphSpec& graph);

/// Refuse a graph that keeps any tensor as external data (a file read by path, outside every check).
void check_self_contained(const std::string& bytes, const std::string& path, const std::string& key);

}  // namespace vpsde
