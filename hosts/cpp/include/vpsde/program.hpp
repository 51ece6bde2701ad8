#pragma once
/// A bundle's program, compiled once from its manifest: the C++ twin of runtime/program.py. Noise call 0 is the
/// prior; each step makes the manifest's graph calls in order (repeats expanded), each noise input of a call taking
/// the next noise call; outputs that roll over replace their value (x_next -> x, each state's output -> its input).

#include <map>
#include <string>
#include <utility>
#include <vector>

#include "vpsde/manifest.hpp"

namespace vpsde {

/// One graph call of a step: its graph key, its noise inputs with their call offsets within the step, and the
/// rolling values (x, states) its outputs replace.
struct StepCall {
  std::string graph;
  std::vector<std::pair<std::string, int>> noise;
  std::vector<std::string> writes;
};

struct Program {
  std::vector<StepCall> calls;                          ///< one step's calls, in order, repeats expanded
  std::vector<std::string> rolling;                     ///< "x", then each state's input
  std::map<std::string, std::string> rolling_of_output;  ///< graph output -> the rolling value it replaces
  int noise_calls_per_step = 0;

  static Program compile(const Manifest& m);
  /// The noise call index of offset `offset` within step `step`'s calls.
  std::uint32_t noise_call(int step, int offset) const {
    return static_cast<std::uint32_t>(1 + static_cast<std::int64_t>(step) * noise_calls_per_step + offset);
  }
  bool is_rolling(const std::string& name) const;
};

}  // namespace vpsde
