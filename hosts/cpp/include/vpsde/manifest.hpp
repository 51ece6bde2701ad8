// The bundle manifest (schema version 2; version 1 reads too), read and checked: errors name the file and the field.
#pragma once

#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

namespace vpsde {

// A user-facing error: the CLI prints its message and exits non-zero.
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

inline constexpr int kSchemaVersion = 2;  // newest version read; 1 (Euler-Maruyama only) reads too
inline constexpr const char* kPhiloxId = "philox4x32-10/box-muller/v1";

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

// Host-carried state: fed to graph input `input`, replaced by graph output `output` after each call (init zeros).
struct StateSpec {
  std::string input, output;
};

struct Manifest {
  std::vector<std::int64_t> sample_shape;
  std::string precision = "fp32";  // the network's compute precision inside the graphs: fp32 | fp16 | bf16
  int steps = 0;
  std::vector<ProgramCall> program;
  std::string final_output;
  std::map<std::string, std::vector<double>> schedule;  // per-step scalars by graph input name, one value per step
  std::map<std::string, GraphSpec> graphs;
  std::string noise_generator;
  std::vector<std::string> noise_inputs{"noise"};  // each takes the next noise call, in this order
  std::vector<StateSpec> state;
  std::vector<std::string> conditioning;  // per-sample inputs the caller supplies (inpainting: known, mask)

  std::int64_t sample_numel() const;
};

// Read <bundle>/manifest.json; check fields, files present and their sha256, IO shapes vs the sample shape.
Manifest load_bundle(const std::string& bundle_dir);

std::string sha256_file(const std::string& path);

}  // namespace vpsde
