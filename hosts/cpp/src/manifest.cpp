#include "vpsde/manifest.hpp"

#include "vpsde/files.hpp"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>

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
        else if (d.is_number_integer() && d.get<std::int64_t>() >= 1) spec.shape.push_back(d.get<std::int64_t>());
        else fail(w + ".shape", "expected positive sizes or symbolic names, got " + shape.dump());  // as Python
      }
      out.push_back(std::move(spec));
    }
    return out;
  }
  static std::string join(const std::string& where, const std::string& key) { return where.empty() ? key : where + "." + key; }
};

// The manifest's field types, from the Python runtime's dataclasses (write_manifest_types.py): every field is
// typed here as Python types it, before the fields this host reads are read.
const json& field_types() {
  static const json table = json::parse(
#include "manifest_types.inc"
  );
  return table;
}

// The first field that does not conform, named as the Python host names it ("field 'x.y[2]': expected ..."). A
// union takes the first of its types the value conforms to, and a mismatch is named at the union, as in Python.
void check_types(const Reader& r, const json& type, const json& value, const std::string& where) {
  const std::string& kind = type.at("type").get_ref<const std::string&>();
  bool ok = true;
  if (kind == "union") {
    ok = std::any_of(type.at("of").begin(), type.at("of").end(), [&](const json& t) {
      try {
        check_types(r, t, value, where);
        return true;
      } catch (const Error&) {
        return false;
      }
    });
  } else if (kind == "list" && value.is_array()) {
    for (std::size_t i = 0; i < value.size(); ++i)
      check_types(r, type.at("of"), value[i], where + "[" + std::to_string(i) + "]");
  } else if (kind == "map" && value.is_object()) {
    for (const auto& [key, v] : value.items())
      check_types(r, type.at("of"), v, where.empty() ? key : where + "." + key);
  } else if (kind == "object" && value.is_object()) {
    for (const auto& f : type.at("fields")) {
      const std::string name = f[0].get<std::string>(), sub = where.empty() ? name : where + "." + name;
      const auto it = value.find(name);
      if (it != value.end()) check_types(r, f[2], *it, sub);
      else if (f[1].get<bool>()) r.fail(sub, "is missing (" + f[2].at("name").get<std::string>() + " expected)");
    }
  } else {
    ok = (kind == "int" && value.is_number_integer()) || (kind == "number" && value.is_number()) ||
         (kind == "string" && value.is_string()) || (kind == "null" && value.is_null());
  }
  if (!ok) {
    const std::string got = value.dump().substr(0, 80);
    r.fail(where.empty() ? "<root>" : where, "expected " + type.at("name").get<std::string>() + ", got " + got);
  }
}

bool is_identifier(const std::string& name) {
  if (name.empty() || name.size() > 64 || !(std::isalpha(static_cast<unsigned char>(name[0])) || name[0] == '_')) return false;
  return std::all_of(name.begin(), name.end(), [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_'; });
}

// Deepest nesting of objects and arrays, strings skipped: checked before any parser sees a hostile file.
int json_depth(const std::string& text) {
  int depth = 0, deepest = 0;
  bool in_string = false, escaped = false;
  for (char c : text) {
    if (in_string) {
      if (escaped) escaped = false;
      else if (c == '\\') escaped = true;
      else if (c == '"') in_string = false;
    } else if (c == '"') in_string = true;
    else if (c == '[' || c == '{') deepest = std::max(deepest, ++depth);
    else if (c == ']' || c == '}') --depth;
  }
  return deepest;
}

// SHA256SUMS ("<64 hex>  <name>\n", sorted by name) -> {name: sha256}; an Error naming the line otherwise.
std::map<std::string, std::string> parse_sums(const std::string& data, const std::string& source) {
  std::map<std::string, std::string> out;
  if (!data.empty() && data.back() != '\n')
    throw Error(source + ": the last line does not end with a newline; the file is truncated or edited");
  std::size_t pos = 0;
  std::string previous;
  for (int number = 1; pos < data.size(); ++number) {
    const std::size_t end = data.find('\n', pos);
    const std::string line = data.substr(pos, end - pos);
    pos = end + 1;
    const bool hex = line.size() > 66 && std::all_of(line.begin(), line.begin() + 64, [](char c) {
      return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
    });
    const std::string name = line.size() > 66 ? line.substr(66) : "";
    if (!hex || line.compare(64, 2, "  ") != 0 || !is_plain_name(name))
      throw Error(source + ": line " + std::to_string(number) + ": expected '<64 lower-case hex>  <file name>'");
    if (out.count(name)) throw Error(source + ": line " + std::to_string(number) + ": '" + name + "' is listed twice");
    if (!previous.empty() && name < previous) throw Error(source + ": lines are not sorted by file name, as vpsde writes them");
    previous = name;
    out[name] = line.substr(0, 64);
  }
  return out;
}

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

Manifest load_bundle(const std::string& bundle_dir, const std::string& expect_digest) {
  const fs::path root(bundle_dir);
  if (!fs::is_directory(root)) throw Error(bundle_dir + ": not a directory; a bundle is a directory holding manifest.json");
  const fs::path path = root / "manifest.json", sums_path = root / "SHA256SUMS";
  std::error_code ec;
  if (!fs::exists(fs::symlink_status(path, ec)))
    throw Error(path.string() + ": no manifest here; a bundle is a directory with manifest.json");
  const std::string bytes = read_regular(inside(bundle_dir, "manifest.json", path.string()), kManifestLimit, "the manifest");
  if (!fs::exists(fs::symlink_status(sums_path, ec)))
    throw Error(sums_path.string() + ": missing; a bundle lists the sha256 of its manifest and graphs in SHA256SUMS "
                "(vpsde 0.2 and later): re-export it with `vpsde export`");
  const std::string sums_bytes = read_regular(inside(bundle_dir, "SHA256SUMS", sums_path.string()), kSumsLimit, "SHA256SUMS");
  const std::string digest = sha256_hex(sums_bytes);
  if (!expect_digest.empty() && digest != expect_digest)
    throw Error(bundle_dir + ": bundle digest is " + digest + ", but " + expect_digest +
                " was expected (--expect-digest): this is not the bundle you pinned");
  const auto sums = parse_sums(sums_bytes, sums_path.string());
  if (!sums.count("manifest.json") || sums.at("manifest.json") != sha256_hex(bytes))
    throw Error(path.string() + ": does not match its sha256 in SHA256SUMS; the manifest was edited after export (or "
                "SHA256SUMS was): re-export the bundle");
  const int depth = json_depth(bytes);
  if (depth > kMaxDepth)
    throw Error(path.string() + ": JSON nested " + std::to_string(depth) + " deep; a manifest needs at most " +
                std::to_string(kMaxDepth));
  json doc;
  try {
    doc = json::parse(bytes);
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
  check_types(r, field_types(), doc, "");

  Manifest m;
  const json& model = r.at(doc, "model", "");
  const json& shape = r.at(model, "sample_shape", "model");
  if (!shape.is_array() || shape.empty()) r.fail("model.sample_shape", "expected a non-empty list of sizes");
  for (const auto& s : shape) {
    if (!s.is_number_integer() || s.get<std::int64_t>() < 1) r.fail("model.sample_shape", "expected positive sizes, got " + shape.dump());
    m.sample_shape.push_back(s.get<std::int64_t>());
    if (m.sample_shape.back() > kMaxSampleNumel || m.sample_numel() > kMaxSampleNumel)
      r.fail("model.sample_shape", "expected at most " + std::to_string(kMaxSampleNumel) + " elements in all, got " + shape.dump());
  }
  if (model.contains("value_range") && !model["value_range"].is_null()) {
    m.value_range = r.numbers(model, "value_range", "model");
    if (m.value_range.size() != 2 || !std::isfinite(m.value_range[0]) || !std::isfinite(m.value_range[1]) ||
        !(m.value_range[0] < m.value_range[1]))
      r.fail("model.value_range", "expected [lo, hi] with finite lo < hi, or null, got " + model["value_range"].dump());
  }
  if (model.contains("precision")) {
    m.precision = r.str(model, "precision", "model");
    if ((" " + std::string(kPrecisions) + " ").find(" " + m.precision + " ") == std::string::npos)
      r.fail("model.precision", "expected one of " + std::string(kPrecisions) + ", got " + model["precision"].dump());
  }

  const json& sampler = r.at(doc, "sampler", "");
  const std::int64_t steps = r.integer(sampler, "steps", "sampler");
  if (steps < 1 || steps > kMaxSteps) r.fail("sampler.steps", "expected 1.." + std::to_string(kMaxSteps) + ", got " + std::to_string(steps));
  m.steps = static_cast<int>(steps);
  m.final_output = r.str(sampler, "final", "sampler");
  if (sampler.contains("task")) {
    m.task = r.str(sampler, "task", "sampler");
    if (m.task != "sample" && m.task != "likelihood")
      r.fail("sampler.task", "expected \"sample\" or \"likelihood\", got \"" + m.task.substr(0, 80) + "\"");
    if (m.task == "likelihood" && version < 3)
      r.fail("sampler.task", "task \"likelihood\" needs schema_version >= 3, the bundle has " + std::to_string(version));
  }
  const json& program = r.at(sampler, "program", "sampler");
  if (!program.is_array() || program.empty()) r.fail("sampler.program", "expected a non-empty list of graph calls");
  for (std::size_t i = 0; i < program.size(); ++i) {
    const std::string w = "sampler.program[" + std::to_string(i) + "]";
    ProgramCall call{r.str(program[i], "graph", w), 1};
    const std::int64_t repeat = program[i].contains("repeat") ? r.integer(program[i], "repeat", w) : 1;
    if (repeat < 1 || repeat > kMaxRepeat) r.fail(w + ".repeat", "expected 1.." + std::to_string(kMaxRepeat) + ", got " + std::to_string(repeat));
    call.repeat = static_cast<int>(repeat);
    m.program.push_back(call);
  }
  std::int64_t per_step = 0;
  for (const auto& c : m.program) per_step += c.repeat;
  if (per_step * m.steps > kMaxCalls)
    r.fail("sampler.program", std::to_string(m.steps) + " steps x " + std::to_string(per_step) + " graph calls per step = " +
                                  std::to_string(per_step * m.steps) + " calls per sample; at most " + std::to_string(kMaxCalls) + " are accepted");

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
  for (const auto& [key, values] : m.schedule)
    if (!std::all_of(values.begin(), values.end(), [](double v) { return std::fabs(v) < kFloat32Limit; }))
      r.fail("schedule." + key, "expected finite float32 numbers, found NaN, Infinity or a magnitude past float32's "
                                "3.4e38");
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
  if (m.noise_generator != kPhiloxId && m.noise_generator != "torch")
    r.fail("noise.generator", "expected \"" + std::string(kPhiloxId) + "\" or \"torch\", got \"" + m.noise_generator + "\"");
  // every graph input name has one source only: noise.inputs naming x or a schedule array would change samples
  std::map<std::string, std::string> roles{{"x", "the sample x"}};
  auto claim = [&](const std::string& where, const std::string& name) {
    if (!is_identifier(name)) r.fail(where, "expected identifiers, got '" + name + "'");
    if (roles.count(name)) r.fail(where, "'" + name + "' is already " + roles[name] + "; each graph input has exactly one source");
    roles[name] = "in " + where;
  };
  for (const auto& [key, _] : m.schedule) claim("schedule", key);
  for (const auto& name : m.noise_inputs) claim("noise.inputs", name);
  for (const auto& s : m.state) claim("sampler.state", s.input);
  for (const auto& name : m.conditioning) claim("sampler.conditioning", name);
  auto is_sample_input = [&](const std::string& name) {
    if (name == "x") return true;
    if (std::find(m.noise_inputs.begin(), m.noise_inputs.end(), name) != m.noise_inputs.end()) return true;
    if (std::find(m.conditioning.begin(), m.conditioning.end(), name) != m.conditioning.end()) return true;
    return std::any_of(m.state.begin(), m.state.end(), [&](const StateSpec& s) { return s.input == name; });
  };

  const json& graphs = r.at(doc, "graphs", "");
  if (!graphs.is_object() || graphs.empty()) r.fail("graphs", "expected an object of graph specs");
  std::map<std::string, std::string> files;
  for (const auto& [key, g] : graphs.items()) {
    if (!is_plain_name(key))
      r.fail("graphs." + key, "a graph key must be a plain name (letters, digits, '_', '.', '-'; no '/', no leading '.')");
    const std::string w = "graphs." + key;
    GraphSpec spec{r.str(g, "file", w), r.str(g, "sha256", w), r.tensors(g, "inputs", w), r.tensors(g, "outputs", w)};
    if (!is_plain_name(spec.file) || spec.file == "manifest.json" || spec.file == "SHA256SUMS")
      r.fail(w + ".file", "expected a plain file name inside the bundle (no '/', no '..'), got '" + spec.file + "'");
    if (files.count(spec.file)) r.fail(w + ".file", "'" + spec.file + "' is also the file of graph '" + files[spec.file] + "'");
    files[spec.file] = key;
    for (const auto* list : {&spec.inputs, &spec.outputs})
      for (const auto& t : *list)
        if (!is_identifier(t.name)) r.fail(w, "graph input and output names must be identifiers, got '" + t.name + "'");
    if (!sums.count(spec.file) || sums.at(spec.file) != spec.sha256)
      throw Error(sums_path.string() + ": the sha256 of " + spec.file + " differs from '" + w + ".sha256' in " +
                  path.string() + " (or is not listed); re-export the bundle");
    check_self_contained(read_graph(bundle_dir, key, spec), (root / spec.file).string(), key);
    for (std::size_t i = 0; i < spec.outputs.size(); ++i)
      if (spec.outputs[i].dtype != "float32")
        r.fail(w + ".outputs[" + std::to_string(i) + "].dtype", "this host runs float32 graph IO, got " + spec.outputs[i].dtype);
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
  if (sums.size() != files.size() + 1)
    throw Error(sums_path.string() + ": lists files beyond manifest.json and the graph files; it must list exactly those");
  m.digest = digest;
  return m;
}

std::string read_graph(const std::string& bundle_dir, const std::string& key, const GraphSpec& graph) {
  const std::string where = "'graphs." + key + ".file' in " + (fs::path(bundle_dir) / "manifest.json").string();
  const std::string data = read_regular(inside(bundle_dir, graph.file, where), kGraphLimit, "graph file named by " + where);
  if (sha256_hex(data) != graph.sha256)
    throw Error((fs::path(bundle_dir) / graph.file).string() + ": sha256 does not match 'graphs." + key + ".sha256' in " +
                (fs::path(bundle_dir) / "manifest.json").string() + "; the file was modified or the manifest edited - re-export the bundle");
  return data;
}

}  // namespace vpsde
