#include "vpsde/sampler.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <utility>

#include "vpsde/files.hpp"
#include "vpsde/limits.hpp"
#include "vpsde/philox.hpp"

namespace vpsde {

// One graph: its session and its IO binding (rebound per call: each call reads and writes other buffers).
struct Sampler::Graph {
  std::string key, path;
  GraphSpec spec;
  Ort::Session session{nullptr};
  std::unique_ptr<Ort::IoBinding> binding;
};

// The buffers of one batch size. Where tensors live follows the provider: host memory on the CPU, the GPU for cuda
// and tensorrt. x, every state and every other graph output stay there (x and each state in two buffers, a call
// reading one and writing the other); what the host owns (noise, schedule scalars, conditioning, the prior x and
// the zero state of the first calls, and the final sample) is host memory bound as it is, so on a GPU ONNX Runtime
// uploads only those per call and the sample comes back once.
struct Sampler::Workspace {
  std::int64_t batch = 0;
  std::map<std::string, std::vector<float>> host;       // host-owned tensors by name
  std::map<std::string, Ort::Value> host_values;         // views of `host`, bound as inputs (or the final output)
  std::map<std::string, std::array<Ort::Value, 2>> rolling;  // x and each state input, on the device
  std::map<std::string, Ort::Value> fixed;               // every other graph output, on the device
};
namespace {

Ort::SessionOptions session_options(const SamplerOptions& o, const std::string& bundle_dir) {
  Ort::SessionOptions so;
  const int threads = o.threads > 0 ? o.threads : default_threads();  // 0: ONNX Runtime's own default
  if (threads > 0) so.SetIntraOpNumThreads(threads);
  so.SetLogSeverityLevel(o.verbose ? 2 : 4);  // fatal only by default: vpsde reports failures itself, in one line
  if (o.provider == "cuda") {
    OrtCUDAProviderOptions cuda{};
    cuda.device_id = o.device_id;
    so.AppendExecutionProvider_CUDA(cuda);
  } else if (o.provider == "tensorrt") {
    static thread_local std::string cache;  // ORT keeps the pointer until the session is made
    cache = o.trt_engine_cache.empty() ? (std::filesystem::path(bundle_dir) / "engines" / "ort-trt").string()
                                       : o.trt_engine_cache;
    OrtTensorRTProviderOptions trt{};
    trt.device_id = o.device_id;
    trt.trt_engine_cache_enable = 1;
    trt.trt_engine_cache_path = cache.c_str();
    so.AppendExecutionProvider_TensorRT(trt);
    OrtCUDAProviderOptions cuda{};  // fallback for nodes TensorRT does not take
    cuda.device_id = o.device_id;
    so.AppendExecutionProvider_CUDA(cuda);
  } else if (o.provider != "cpu") {
    throw Error("unknown provider '" + o.provider + "'; expected cpu, cuda or tensorrt");
  }
  if (o.configure_session) o.configure_session(so);
  return so;
}

std::string first_line(const std::string& s) { return s.substr(0, s.find('\n')); }

// ONNX Runtime's words for a graph that keeps tensors outside itself; loaded from bytes, it cannot resolve them
std::string explain_load_error(const std::string& what) {
  if (what.find("external data") != std::string::npos || what.find("model_path must not be empty") != std::string::npos)
    return "the graph keeps tensors as external data (files outside the .onnx); a bundle's graphs must be "
           "self-contained: re-export the bundle (" + first_line(what) + ")";
  return first_line(what);
}

// Graph IO as ONNX Runtime reads it from the file against the manifest's declaration, the Python host's rule: the
// same names, dtypes and sizes, a symbolic dimension (the batch) symbolic in both.
void check_session_io(Ort::Session& session, const GraphSpec& spec, const std::string& key, const std::string& path) {
  Ort::AllocatorWithDefaultOptions allocator;
  const auto dtype = [](ONNXTensorElementDataType t) -> std::string {
    switch (t) {
      case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float32";
      case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
      case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return "bfloat16";
      case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
      case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
      default: return "onnx element type " + std::to_string(static_cast<int>(t));
    }
  };
  const auto describe = [](const std::string& name, const std::string& type, const std::vector<std::int64_t>& shape) {
    std::string out = name + ": " + type + " [";
    for (std::size_t i = 0; i < shape.size(); ++i)
      out += (i ? ", " : "") + (shape[i] < 0 ? "?" : std::to_string(shape[i]));
    return out + "]";
  };
  for (const bool outputs : {false, true}) {
    const std::vector<TensorSpec>& declared = outputs ? spec.outputs : spec.inputs;
    const std::size_t count = outputs ? session.GetOutputCount() : session.GetInputCount();
    const std::string kind = outputs ? "outputs" : "inputs";
    std::map<std::string, std::string> graph_io, manifest_io;
    for (std::size_t i = 0; i < count; ++i) {
      const auto name =
          outputs ? session.GetOutputNameAllocated(i, allocator) : session.GetInputNameAllocated(i, allocator);
      const Ort::TypeInfo type = outputs ? session.GetOutputTypeInfo(i) : session.GetInputTypeInfo(i);
      if (type.GetONNXType() != ONNX_TYPE_TENSOR) {
        graph_io[name.get()] = std::string(name.get()) + ": not a tensor";
        continue;
      }
      const auto info = type.GetTensorTypeAndShapeInfo();
      graph_io[name.get()] = describe(name.get(), dtype(info.GetElementType()), info.GetShape());
    }
    for (const TensorSpec& t : declared) manifest_io[t.name] = describe(t.name, t.dtype, t.shape);
    if (graph_io != manifest_io) {
      const auto join = [](const std::map<std::string, std::string>& io) {
        std::string out;
        for (const auto& [_, text] : io) out += (out.empty() ? "" : ", ") + text;
        return "{" + out + "}";
      };
      throw Error(path + ": graph " + kind + " " + join(graph_io) + " do not match 'graphs." + key + "." + kind +
                  "' in the manifest " + join(manifest_io));
    }
  }
}

}  // namespace

const char* version() { return VPSDE_VERSION; }

Sampler::Sampler(std::string bundle_dir, SamplerOptions options)
    : bundle_dir_(std::move(bundle_dir)), options_(std::move(options)),
      manifest_(load_bundle(bundle_dir_, options_.expect_digest)), program_(Program::compile(manifest_)) {
  if (options_.env == nullptr)
    own_env_ = std::make_unique<Ort::Env>(options_.verbose ? ORT_LOGGING_LEVEL_WARNING : ORT_LOGGING_LEVEL_FATAL, "vpsde");
  Ort::Env& env = options_.env ? *options_.env : *own_env_;
  if (options_.threads < 0 || options_.threads > kMaxThreads)
    throw Error("--threads: expected 1.." + std::to_string(kMaxThreads) + ", got " + std::to_string(options_.threads));
  if (manifest_.noise_generator != kPhiloxId)
    throw Error(bundle_dir_ + "/manifest.json: field 'noise.generator': this host implements '" + std::string(kPhiloxId) +
                "', the bundle asks for '" + manifest_.noise_generator + "'");
  if (manifest_.precision == "bf16" && options_.provider == "cpu")
    throw Error(bundle_dir_ + "/manifest.json: field 'model.precision' is \"bf16\"; ONNX Runtime's CPU provider has no "
                "bfloat16 kernels: run it with --provider tensorrt, or export with --precision fp16 or fp32");
  Ort::SessionOptions so;
  try {
    so = session_options(options_, bundle_dir_);
  } catch (const Ort::Exception& e) {
    throw Error("ONNX Runtime provider '" + options_.provider + "' is not available in this build: " + first_line(e.what()));
  }
  for (const auto& [key, spec] : manifest_.graphs) {
    auto g = std::make_unique<Graph>();
    g->key = key;
    g->spec = spec;
    g->path = (std::filesystem::path(bundle_dir_) / spec.file).string();
    const std::string bytes = read_graph(bundle_dir_, key, spec);  // the checked bytes, not the path
    try {
      g->session = Ort::Session(env, bytes.data(), bytes.size(), so);
    } catch (const Ort::Exception& e) {
      throw Error(g->path + ": ONNX Runtime could not load graph '" + key + "': " + explain_load_error(e.what()));
    }
    check_session_io(g->session, spec, key, g->path);
    g->binding = std::make_unique<Ort::IoBinding>(g->session);
    graphs_.emplace(key, std::move(g));
  }
  // The device buffers (x, state, outputs) come from the first session's allocator for the provider's memory.
  const Ort::MemoryInfo memory = options_.provider == "cpu"
                                     ? Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault)
                                     : Ort::MemoryInfo("Cuda", OrtArenaAllocator, options_.device_id, OrtMemTypeDefault);
  try {
    allocator_ = std::make_unique<Ort::Allocator>(graphs_.begin()->second->session, memory);
  } catch (const Ort::Exception& e) {
    throw Error("ONNX Runtime has no allocator for provider '" + options_.provider + "': " + first_line(e.what()));
  }
}

Sampler::~Sampler() {
  // Teardown order matters: the IO bindings hold references to the workspace's device buffers, whose memory
  // belongs to allocator_; release the bindings first, then the buffers, then the allocator, then the sessions.
  // (Destroying the allocator while a binding still held a buffer crashed ~5% of runs at exit, in ORT's free.)
  for (auto& entry : graphs_) entry.second->binding.reset();
  ws_.reset();
  allocator_.reset();
  graphs_.clear();
}

void Sampler::check_memory(std::int64_t num, std::int64_t batch) const {
  std::string file;
  const long double have = memory_limit(file);
  if (have <= 0) return;
  const long double need = 4.0L * manifest_.sample_numel() * (static_cast<long double>(num) + 12.0L * batch);
  if (need <= have) return;
  const auto gib = [](long double bytes) {  // one decimal, as the Python host writes it
    char text[32];
    std::snprintf(text, sizeof text, "%.1Lf GiB", bytes / (1ull << 30));
    return std::string(text);
  };
  const std::string limit =
      file.empty() ? "this machine's " + gib(have) : "the " + gib(have) + " its cgroup allows (" + file + ")";
  throw Error(std::to_string(num) + " samples in batches of " + std::to_string(batch) + " need about " + gib(need) +
              ", more than " + limit +
              ": sample fewer at a time (--num, --batch) and shard with --first-sample");
}

std::vector<float> Sampler::sample(std::int64_t num, std::uint64_t seed, std::int64_t batch, std::uint64_t first_sample,
                                  const std::map<std::string, NpyArray>& conditioning, const ProgressFn& progress) {
  if (num < 1) throw Error("--num must be >= 1");
  check_memory(num, batch < 1 || batch > num ? num : batch);
  std::vector<float> out(static_cast<std::size_t>(num * manifest_.sample_numel()));
  sample_into(out.data(), out.size(), num, seed, batch, first_sample, conditioning, progress);
  return out;
}

void Sampler::sample_into(float* out, std::size_t capacity, std::int64_t num, std::uint64_t seed, std::int64_t batch,
                          std::uint64_t first_sample, const std::map<std::string, NpyArray>& conditioning,
                          const ProgressFn& progress) {
  std::lock_guard<std::mutex> lock(mutex_);  // one sample() at a time: the sessions' buffers are shared
  check_task("sample");
  check_range(num, first_sample, batch);
  if (out == nullptr || capacity < static_cast<std::size_t>(num) * static_cast<std::size_t>(manifest_.sample_numel()))
    throw Error("the output buffer holds " + std::to_string(capacity) + " floats; " + std::to_string(num) +
                " samples need " + std::to_string(num * manifest_.sample_numel()));
  const std::int64_t numel = manifest_.sample_numel();
  std::vector<std::string> wanted = manifest_.conditioning, given;
  for (const auto& [name, _] : conditioning) given.push_back(name);
  std::sort(wanted.begin(), wanted.end());
  auto list = [](const std::vector<std::string>& v) {
    std::string s;
    for (const auto& n : v) s += (s.empty() ? "" : ", ") + n;
    return s.empty() ? std::string("none") : s;
  };
  if (given != wanted)
    throw Error(bundle_dir_ + ": the bundle takes conditioning inputs " + list(wanted) + ", got " + list(given) +
                " (pass each as --cond NAME=FILE.npy)");
  for (const auto& [name, a] : conditioning) {
    std::vector<std::int64_t> per_sample = manifest_.sample_shape, all{num};
    all.insert(all.end(), per_sample.begin(), per_sample.end());
    auto str = [](const std::vector<std::int64_t>& v) {
      std::string t = "[";
      for (std::size_t i = 0; i < v.size(); ++i) t += (i ? ", " : "") + std::to_string(v[i]);
      return t + "]";
    };
    if (a.shape != per_sample && a.shape != all)
      throw Error("conditioning input '" + name + "': expected shape " + str(per_sample) + " or " + str(all) +
                  ", got " + str(a.shape));
  }
  for (std::int64_t start = 0; start < num; start += batch) {
    const std::int64_t size = std::min(batch, num - start);
    std::map<std::string, CondView> cond;
    for (const auto& [name, a] : conditioning) {
      const bool shared = a.shape.size() == manifest_.sample_shape.size();  // [*S]: the same for every sample
      cond[name] = {shared ? a.data.data() : a.data.data() + start * numel, shared};
    }
    run_batch(seed, first_sample + static_cast<std::uint64_t>(start), size, nullptr, out + start * numel, cond, progress);
  }
}

std::vector<double> Sampler::log_likelihood(const float* points, std::int64_t num, std::uint64_t seed,
                                            std::int64_t batch, std::uint64_t first_sample, const ProgressFn& progress) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_task("likelihood");
  check_range(num, first_sample, batch);
  if (points == nullptr) throw Error("no points to score");
  const std::int64_t numel = manifest_.sample_numel();
  for (std::int64_t i = 0; i < num; ++i)
    if (!std::all_of(points + i * numel, points + (i + 1) * numel, [](float v) { return std::isfinite(v); }))
      throw Error("data: row " + std::to_string(i) + " holds NaN or Infinity");
  const auto& vr = manifest_.value_range;
  if (!vr.empty()) {
    const auto [lo, hi] = std::minmax_element(points, points + num * numel);
    if (*lo < vr[0] || *hi > vr[1])
      throw Error("data: values span [" + std::to_string(*lo) + ", " + std::to_string(*hi) + "], outside the model's "
                  "value range [" + std::to_string(vr[0]) + ", " + std::to_string(vr[1]) + "] (model.value_range)");
  }
  check_memory(num, batch);
  std::vector<double> logp(static_cast<std::size_t>(num));
  std::vector<float> elements(static_cast<std::size_t>(batch * numel));
  for (std::int64_t start = 0; start < num; start += batch) {
    const std::int64_t size = std::min(batch, num - start);
    run_batch(seed, first_sample + static_cast<std::uint64_t>(start), size, points + start * numel, elements.data(),
              {}, progress);
    for (std::int64_t b = 0; b < size; ++b) {
      double sum = 0.0;  // in element order: the Python runtime's sum too
      for (std::int64_t k = 0; k < numel; ++k) sum += static_cast<double>(elements[b * numel + k]);
      logp[static_cast<std::size_t>(start + b)] = sum;
    }
  }
  return logp;
}

void Sampler::check_task(const std::string& task) const {
  if (manifest_.task == task) return;
  if (task == "sample")
    throw Error(bundle_dir_ + ": this bundle computes likelihoods (sampler.task \"likelihood\"), it does not sample: "
                "run it with --data POINTS.npy (Sampler::log_likelihood)");
  throw Error(bundle_dir_ + ": this bundle samples (sampler.task \"" + manifest_.task + "\"); likelihoods need a bundle "
              "exported with --sampler likelihood");
}

void Sampler::check_range(std::int64_t num, std::uint64_t first_sample, std::int64_t& batch) const {
  if (num < 1) throw Error("--num must be >= 1");
  if (first_sample > UINT64_MAX - static_cast<std::uint64_t>(num - 1))
    throw Error("--first-sample " + std::to_string(first_sample) + " + --num " + std::to_string(num) +
                " passes the last sample index 2^64 - 1");
  if (batch < 1 || batch > num) batch = num;
}

namespace {

std::vector<std::int64_t> concrete(const std::vector<std::int64_t>& shape, std::int64_t batch) {
  std::vector<std::int64_t> out = shape;
  for (auto& d : out) d = d < 0 ? batch : d;
  return out;
}

}  // namespace

Sampler::Workspace& Sampler::workspace(std::int64_t size) {
  if (ws_ && ws_->batch == size) return *ws_;
  ws_.reset();
  auto ws = std::make_unique<Workspace>();
  ws->batch = size;
  const Ort::MemoryInfo cpu = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
  auto host_value = [&](const std::string& name, const std::vector<std::int64_t>& shape) {
    std::int64_t n = 1;
    for (auto d : shape) n *= d;
    auto& buf = ws->host[name];
    buf.assign(static_cast<std::size_t>(n), 0.0f);
    ws->host_values.emplace(name, Ort::Value::CreateTensor<float>(cpu, buf.data(), buf.size(), shape.data(), shape.size()));
  };
  for (const auto& [key, g] : graphs_) {
    for (const TensorSpec& t : g->spec.inputs) {
      const auto shape = concrete(t.shape, size);
      if (!ws->host.count(t.name)) host_value(t.name, shape);  // noise, schedule, conditioning; x and state: first call
      if (program_.is_rolling(t.name) && !ws->rolling.count(t.name))
        ws->rolling.emplace(t.name, std::array<Ort::Value, 2>{
            Ort::Value::CreateTensor<float>(*allocator_, shape.data(), shape.size()),
            Ort::Value::CreateTensor<float>(*allocator_, shape.data(), shape.size())});
    }
    for (const TensorSpec& t : g->spec.outputs) {
      const auto shape = concrete(t.shape, size);
      if (t.name == manifest_.final_output && !ws->host.count("final:" + t.name)) host_value("final:" + t.name, shape);
      if (!program_.rolling_of_output.count(t.name) && !ws->fixed.count(t.name))
        ws->fixed.emplace(t.name, Ort::Value::CreateTensor<float>(*allocator_, shape.data(), shape.size()));
    }
  }
  ws_ = std::move(ws);
  return *ws_;
}

struct Sampler::Rolling {
  std::map<std::string, int> parity;      // rolling value -> which of its two buffers is current
  std::map<std::string, bool> on_device;  // false until a graph has written it: read the host copy
};

// The program on one batch from `start` (a likelihood program's points) or, when null, the prior (noise call 0).
void Sampler::run_batch(std::uint64_t seed, std::uint64_t first, std::int64_t size, const float* start, float* out,
                        const std::map<std::string, CondView>& cond, const ProgressFn& progress) {
  const std::size_t numel = static_cast<std::size_t>(manifest_.sample_numel());
  auto draw = [&](std::uint32_t call, float* dst) {
    for (std::int64_t b = 0; b < size; ++b) philox_normal(seed, call, first + static_cast<std::uint64_t>(b), dst + b * numel, numel);
  };
  Workspace& ws = workspace(size);
  // conditioning inputs are never written by a graph: fill them once per batch (a shared [*S] array is
  // repeated for every sample)
  for (const auto& [name, view] : cond)
    for (std::int64_t b = 0; b < size; ++b) {
      const float* src = view.data + (view.shared ? 0 : b * static_cast<std::int64_t>(numel));
      std::copy(src, src + numel, ws.host.at(name).begin() + b * static_cast<std::int64_t>(numel));
    }
  if (start != nullptr)  // bound from the host on the first call, as the prior is
    std::copy(start, start + size * static_cast<std::int64_t>(numel), ws.host.at("x").begin());
  else
    draw(0, ws.host.at("x").data());  // the prior x_T is noise call 0
  for (const StateSpec& st : manifest_.state) std::fill(ws.host.at(st.input).begin(), ws.host.at(st.input).end(), 0.0f);
  Rolling roll;
  for (const auto& [name, _] : ws.rolling) roll.parity[name] = 0, roll.on_device[name] = false;
  const std::size_t calls = program_.calls.size();
  for (int i = 0; i < manifest_.steps; ++i) {
    for (std::size_t k = 0; k < calls; ++k) {
      const StepCall& call = program_.calls[k];
      const bool last_call = i == manifest_.steps - 1 && k + 1 == calls;
      Graph& g = *graphs_.at(call.graph);
      bind_call(g, ws, roll, i, last_call);
      for (const auto& [name, offset] : call.noise) draw(program_.noise_call(i, offset), ws.host.at(name).data());
      run_call(g, i);
      finish_call(g, ws, roll, i, last_call);
    }
    if (progress && !progress(i, manifest_.steps))
      throw Cancelled("sampling cancelled at step " + std::to_string(i) + " of " + std::to_string(manifest_.steps));
  }
  const auto& result = ws.host.at("final:" + manifest_.final_output);
  std::copy(result.begin(), result.end(), out);
}

// Inputs: the step's schedule values (host), rolling values on the device once a graph has written them (the
// host's prior and zero state before), everything else from the host. Outputs: rolling ones into the other
// buffer, the final sample of the last call to the host, every other into its device buffer.
void Sampler::bind_call(Graph& g, Workspace& ws, const Rolling& roll, int step, bool last_call) {
  Ort::IoBinding& binding = *g.binding;
  for (const TensorSpec& t : g.spec.inputs) {
    if (manifest_.schedule.count(t.name)) {
      auto& buf = ws.host.at(t.name);
      std::fill(buf.begin(), buf.end(), static_cast<float>(manifest_.schedule.at(t.name)[step]));
    }
    auto rolling = ws.rolling.find(t.name);
    if (rolling != ws.rolling.end() && roll.on_device.at(t.name))
      binding.BindInput(t.name.c_str(), rolling->second[roll.parity.at(t.name)]);
    else
      binding.BindInput(t.name.c_str(), ws.host_values.at(t.name));
  }
  for (const TensorSpec& t : g.spec.outputs) {
    auto into = program_.rolling_of_output.find(t.name);
    if (last_call && t.name == manifest_.final_output)
      binding.BindOutput(t.name.c_str(), ws.host_values.at("final:" + t.name));  // the sample comes back once
    else if (into != program_.rolling_of_output.end())
      binding.BindOutput(t.name.c_str(), ws.rolling.at(into->second)[1 - roll.parity.at(into->second)]);
    else
      binding.BindOutput(t.name.c_str(), ws.fixed.at(t.name));
  }
}

void Sampler::run_call(Graph& g, int step) {
  try {
    g.session.Run(Ort::RunOptions{nullptr}, *g.binding);
  } catch (const Ort::Exception& e) {
    throw Error(g.path + ": ONNX Runtime failed running graph '" + g.key + "' at step " + std::to_string(step) + ": " +
                first_line(e.what()));
  }
}

// The NaN guard (every output on the CPU; on a GPU the final sample only), then the rolling outputs become current.
void Sampler::finish_call(Graph& g, Workspace& ws, Rolling& roll, int step, bool last_call) {
  const bool host_memory = options_.provider == "cpu";
  for (const TensorSpec& t : g.spec.outputs) {
    auto into = program_.rolling_of_output.find(t.name);
    const bool final_here = last_call && t.name == manifest_.final_output;
    if (options_.nan_guard && (host_memory || final_here)) {
      const Ort::Value& value = final_here ? ws.host_values.at("final:" + t.name)
                                : into != program_.rolling_of_output.end()
                                    ? ws.rolling.at(into->second)[1 - roll.parity.at(into->second)]
                                    : ws.fixed.at(t.name);
      const float* data = value.GetTensorData<float>();
      const std::size_t n = value.GetTensorTypeAndShapeInfo().GetElementCount();
      if (!std::all_of(data, data + n, [](float v) { return std::isfinite(v); }))
        throw Error(g.path + ": graph '" + g.key + "' produced NaN/Inf in output '" + t.name + "' at step " +
                    std::to_string(step) + " (of 0.." + std::to_string(manifest_.steps - 1) + ")");
    }
    if (into != program_.rolling_of_output.end() && !final_here) {
      roll.parity[into->second] ^= 1;
      roll.on_device[into->second] = true;
    }
  }
}

}  // namespace vpsde
