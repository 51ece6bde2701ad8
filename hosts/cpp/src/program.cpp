#include "vpsde/program.hpp"

#include <algorithm>

namespace vpsde {

Program Program::compile(const Manifest& m) {
  Program p;
  p.rolling.push_back("x");
  p.rolling_of_output["x_next"] = "x";
  for (const StateSpec& st : m.state) {
    p.rolling.push_back(st.input);
    p.rolling_of_output[st.output] = st.input;
  }
  int offset = 0;
  for (const ProgramCall& pc : m.program) {
    const GraphSpec& g = m.graphs.at(pc.graph);
    std::vector<std::string> writes;
    for (const TensorSpec& t : g.outputs) {
      auto roll = p.rolling_of_output.find(t.name);
      if (roll != p.rolling_of_output.end()) writes.push_back(roll->second);
    }
    for (int r = 0; r < pc.repeat; ++r) {
      StepCall call{pc.graph, {}, writes};
      for (const std::string& name : m.noise_inputs)
        if (std::any_of(g.inputs.begin(), g.inputs.end(), [&](const TensorSpec& t) { return t.name == name; }))
          call.noise.emplace_back(name, offset++);
      p.calls.push_back(std::move(call));
    }
  }
  p.noise_calls_per_step = offset;
  return p;
}

bool Program::is_rolling(const std::string& name) const {
  return std::find(rolling.begin(), rolling.end(), name) != rolling.end();
}

}  // namespace vpsde
