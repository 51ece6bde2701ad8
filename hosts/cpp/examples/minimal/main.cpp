// sample_bundle BUNDLE NUM SEED OUT.npy: the smallest application of the vpsde library. It samples into its own
// buffer with a progress callback (which could cancel by returning false) and writes float32 [NUM, *shape].
#include <iostream>
#include <string>
#include <vector>

#include "vpsde/npy.hpp"
#include "vpsde/sampler.hpp"

int main(int argc, char** argv) {
  if (argc != 5) {
    std::cerr << "usage: sample_bundle BUNDLE NUM SEED OUT.npy\n";
    return 2;
  }
  try {
    vpsde::SamplerOptions options;
    options.threads = 1;
    vpsde::Sampler sampler(argv[1], options);
    const std::int64_t num = std::stoll(argv[2]);
    std::vector<float> buffer(static_cast<std::size_t>(num * sampler.manifest().sample_numel()));
    int last = -1;
    sampler.sample_into(buffer.data(), buffer.size(), num, std::stoull(argv[3]), 0, 0, {},
                        [&](int step, int) { return (last = step), true; });
    std::vector<std::int64_t> shape{num};
    for (auto d : sampler.manifest().sample_shape) shape.push_back(d);
    vpsde::AtomicFile out(argv[4]);
    vpsde::write_npy(out, buffer, shape);
    std::cout << "vpsde " << vpsde::version() << ": " << num << " samples, " << last + 1 << " steps, digest "
              << sampler.manifest().digest << "\n";
    return 0;
  } catch (const vpsde::Error& e) {
    std::cerr << "sample_bundle: error: " << e.what() << "\n";
    return 2;
  }
}
