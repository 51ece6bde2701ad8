#include "vpsde/manifest.hpp"

#include <openssl/evp.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>

namespace fs = std::filesystem;
using nlohmann::json;

namespace vpsde {
namespace {

struct Reader {
  std::string source;  // the manifest path, for messages

  [[noreturn]] void fail(const std::string& field, const std::string& what) const {
    throw Error(source + ": field '" + field + "': " + what);
  }
  const json& at(const json& obj, const std::string& key, const std::string& field) const {
    if (!obj.is_object()) fail(field, "expected an object");
    auto it = obj.find(key);
    if (it == obj.end()) fail(field.empty() ? key : field + "." + key, "is missing");
    return *it;
  }
  std::string str(const json& obj, const std::string& key, const std::string& where) const {
    const json& v = at(obj, key, where);
    if (!v.is_string()) fail(join(where, key), "expected a string, got " + v.dump());
    return v.get<std::string>();
  }
  std::int64_t integer(const json& obj, const std::string& key, const std::string& where) const {
    const json& v = at(obj, key, where);
    if (!v.is_number_integer()) fail(join(where, key), "expected an integer, got " + v.dump());
    return v.get<std::int64_t>();
  }
  std::vector<double> numbers(const json& obj, const std::string& key, const std::string& where) const {
    const json& v = at(obj, key, where);
    if (!v.is_array()) fail(join(where, key), "expected a list of numbers");
    std::vector<double> out;
    for (const auto& x : v) {
      if (!x.is_number()) fail(join(where, key), "expected a list of numbers, found " + x.dump());
      out.push_back(x.get<double>());
    }
    return out;
  }
  std::vector<TensorSpec> tensors(const json& obj, const std::string& key, const std::string& where) const {
    const json& v = at(obj, key, where);
    if (!v.is_array()) fail(join(where, key), "expected a list of tensor specs");
    std::vector<TensorSpec> out;
    for (std::size_t i = 0; i < v.size(); ++i) {
      const std::string w = join(where, key) + "[" + std::to_string(i) + "]";
      TensorSpec spec{str(v[i], "name", w), str(v[i], "dtype", w), {}};
      const json& shape = at(v[i], "shape", w);
      if (!shape.is_array()) fail(w + ".shape", "expected a list");
      for (const auto& d : shape) {
        if (d.is_string()) spec.shape.push_back(-1);
        else if (d.is_number_integer()) spec.shape.push_back(d.get<std::int64_t>());
        else fail(w + ".shape", "expected sizes or symbolic names, got " + d.dump());
      }
      out.push_back(std::move(spec));
    }
    return out;
  }
  static std::string join(const std::string& where, const std::string& key) { return where.empty() ? key : where + "." + key; }
};

std::string shape_str(const std::vector<std::int64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + (shape[i] < 0 ? std::string("batch") : std::to_string(shape[i]));
  return s + "]";
}

}  // namespace

std::int64_t Manifest::sample_numel() const {
  std::int64_t n = 1;
  for (auto s : sample_shape) n *= s;
  return n;
}

std::string sha256_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path + ": cannot open for reading");
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(), EVP_MD_CTX_free);
  EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr);
  std::vector<char> buf(1 << 20);
  while (in) {
    in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    EVP_DigestUpdate(ctx.get(), buf.data(), static_cast<std::size_t>(in.gcount()));
  }
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  EVP_DigestFinal_ex(ctx.get(), digest, &len);
  std::ostringstream hex;
  for (unsigned int i = 0; i < len; ++i) hex << std::hex << std::setw(2) << std::setfill('0') << static_cast<int>(digest[i]);
  return hex.str();
}

Manifest load_bundle(const std::string& bundle_dir) {
  const fs::path root(bundle_dir);
  if (!fs::is_directory(root)) throw Error(bundle_dir + ": not a directory; a bundle is a directory holding manifest.json");
  const fs::path path = root / "manifest.json";
  std::ifstream in(path);
  if (!in) throw Error(path.string() + ": no manifest here; a bundle is a directory with manifest.json");
  json doc;
  try {
    doc = json::parse(in);
  } catch (const json::parse_error& e) {
    throw Error(path.string() + ": not valid JSON (" + e.what() + ")");
  }
  const Reader r{path.string()};
  if (!doc.is_object()) throw Error(path.string() + ": expected a JSON object at the top level");
  if (r.str(doc, "format", "") != "vpsde-bundle") r.fail("format", "expected \"vpsde-bundle\"");
  const auto version = r.integer(doc, "schema_version", "");
  if (version < 1 || version > kSchemaVersion)
    r.fail("schema_version", "this host reads schema versions 1.." + std::to_string(kSchemaVersion) + ", the bundle has " +
                                 std::to_string(version) + "; re-export the bundle or use a matching vpsde-sample");

  Manifest m;
  const json& model = r.at(doc, "model", "");
  const json& shape = r.at(model, "sample_shape", "model");
  if (!shape.is_array() || shape.empty()) r.fail("model.sample_shape", "expected a non-empty list of sizes");
  for (const auto& s : shape) {
    if (!s.is_number_integer() || s.get<std::int64_t>() < 1) r.fail("model.sample_shape", "expected positive sizes, got " + shape.dump());
    m.sample_shape.push_back(s.get<std::int64_t>());
  }
  if (model.contains("precision")) {
    if (!model["precision"].is_string()) r.fail("model.precision", "expected \"fp32\", \"fp16\" or \"bf16\"");
    m.precision = model["precision"].get<std::string>();
  }

  const json& sampler = r.at(doc, "sampler", "");
  m.steps = static_cast<int>(r.integer(sampler, "steps", "sampler"));
  if (m.steps < 1) r.fail("sampler.steps", "expected >= 1");
  m.final_output = r.str(sampler, "final", "sampler");
  const json& program = r.at(sampler, "program", "sampler");
  if (!program.is_array() || program.empty()) r.fail("sampler.program", "expected a non-empty list of graph calls");
  for (std::size_t i = 0; i < program.size(); ++i) {
    const std::string w = "sampler.program[" + std::to_string(i) + "]";
    ProgramCall call{r.str(program[i], "graph", w), 1};
    if (program[i].contains("repeat")) call.repeat = static_cast<int>(r.integer(program[i], "repeat", w));
    if (call.repeat < 1) r.fail(w + ".repeat", "expected >= 1");
    m.program.push_back(call);
  }

  if (sampler.contains("state")) {
    const json& state = sampler.at("state");
    if (!state.is_array()) r.fail("sampler.state", "expected a list");
    for (std::size_t i = 0; i < state.size(); ++i) {
      const std::string w = "sampler.state[" + std::to_string(i) + "]";
      m.state.push_back({r.str(state[i], "input", w), r.str(state[i], "output", w)});
      if (state[i].contains("init") && state[i].at("init") != "zeros") r.fail(w + ".init", "expected \"zeros\"");
    }
  }
  if (sampler.contains("conditioning")) {
    const json& cond = sampler.at("conditioning");
    if (!cond.is_array()) r.fail("sampler.conditioning", "expected a list of input names");
    for (const auto& v : cond) {
      if (!v.is_string()) r.fail("sampler.conditioning", "expected a list of input names, found " + v.dump());
      m.conditioning.push_back(v.get<std::string>());
    }
  }

  const json& schedule = r.at(doc, "schedule", "");
  if (!schedule.is_object()) r.fail("schedule", "expected an object of per-step arrays");
  for (const auto& [key, _] : schedule.items()) {
    m.schedule[key] = r.numbers(schedule, key, "schedule");
    if (static_cast<int>(m.schedule[key].size()) != m.steps)
      r.fail("schedule." + key, "expected " + std::to_string(m.steps) + " values (sampler.steps), got " +
                                    std::to_string(m.schedule[key].size()));
  }
  if (m.schedule.count("dt"))
    for (double dt : m.schedule["dt"])
      if (!(dt < 0)) r.fail("schedule.dt", "reverse-time steps must be negative");

  const json& noise = r.at(doc, "noise", "");
  m.noise_generator = r.str(noise, "generator", "noise");
  if (noise.contains("inputs")) {
    m.noise_inputs.clear();
    const json& inputs = noise.at("inputs");
    if (!inputs.is_array()) r.fail("noise.inputs", "expected a list of input names");
    for (const auto& v : inputs) {
      if (!v.is_string()) r.fail("noise.inputs", "expected a list of input names, found " + v.dump());
      m.noise_inputs.push_back(v.get<std::string>());
    }
  }
  auto is_sample_input = [&](const std::string& name) {
    if (name == "x") return true;
    if (std::find(m.noise_inputs.begin(), m.noise_inputs.end(), name) != m.noise_inputs.end()) return true;
    if (std::find(m.conditioning.begin(), m.conditioning.end(), name) != m.conditioning.end()) return true;
    return std::any_of(m.state.begin(), m.state.end(), [&](const StateSpec& s) { return s.input == name; });
  };

  const json& graphs = r.at(doc, "graphs", "");
  if (!graphs.is_object() || graphs.empty()) r.fail("graphs", "expected an object of graph specs");
  for (const auto& [key, g] : graphs.items()) {
    const std::string w = "graphs." + key;
    GraphSpec spec{r.str(g, "file", w), r.str(g, "sha256", w), r.tensors(g, "inputs", w), r.tensors(g, "outputs", w)};
    const fs::path file(spec.file);
    if (file.is_absolute() || spec.file.find("..") != std::string::npos) r.fail(w + ".file", "expected a path inside the bundle");
    const fs::path gpath = root / file;
    if (!fs::is_regular_file(gpath))
      throw Error(gpath.string() + ": graph file named by '" + w + ".file' in " + path.string() + " is missing");
    const std::string actual = sha256_file(gpath.string());
    if (actual != spec.sha256)
      throw Error(gpath.string() + ": sha256 is " + actual + ", but '" + w + ".sha256' in " + path.string() + " says " +
                  spec.sha256 + "; the file was modified or the manifest edited - re-export the bundle");
    for (std::size_t i = 0; i < spec.inputs.size(); ++i) {
      const TensorSpec& t = spec.inputs[i];
      if (t.dtype != "float32") r.fail(w + ".inputs[" + std::to_string(i) + "].dtype", "this host runs float32 graph IO, got " + t.dtype);
      const std::string w_in = w + ".inputs[" + std::to_string(i) + "]";
      const bool scalar = m.schedule.count(t.name) > 0;
      if (!scalar && !is_sample_input(t.name))
        r.fail(w_in, "no source for input '" + t.name + "'; a graph input is 'x', a 'schedule' array, one of "
                     "'noise.inputs', a 'sampler.state' input or one of 'sampler.conditioning'");
      std::vector<std::int64_t> want{-1};
      if (!scalar) want.insert(want.end(), m.sample_shape.begin(), m.sample_shape.end());
      if (t.shape != want)
        r.fail(w + ".inputs[" + std::to_string(i) + "].shape",
               "expected " + shape_str(want) + " for input '" + t.name + "' (model.sample_shape), got " + shape_str(t.shape));
    }
    m.graphs.emplace(key, std::move(spec));
  }
  for (std::size_t i = 0; i < m.program.size(); ++i)
    if (!m.graphs.count(m.program[i].graph))
      r.fail("sampler.program[" + std::to_string(i) + "].graph", "'" + m.program[i].graph + "' is not in 'graphs'");
  const auto& last_outputs = m.graphs.at(m.program.back().graph).outputs;
  if (std::none_of(last_outputs.begin(), last_outputs.end(), [&](const TensorSpec& t) { return t.name == m.final_output; }))
    r.fail("sampler.final", "graph '" + m.program.back().graph + "' has no output '" + m.final_output + "'");
  for (const auto& [key, g] : m.graphs)
    if (std::none_of(g.outputs.begin(), g.outputs.end(), [](const TensorSpec& t) { return t.name == "x_next"; }))
      r.fail("graphs." + key + ".outputs", "expected an output named 'x_next'");
  return m;
}

}  // namespace vpsde
