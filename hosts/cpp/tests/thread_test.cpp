// CTest: one Sampler shared by several threads (calls serialize) and one Sampler per thread sharing an Ort::Env
// give exactly the samples of sequential calls. Usage: vpsde-thread-test BUNDLE
#include <iostream>
#include <thread>
#include <vector>

#include "vpsde/sampler.hpp"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: vpsde-thread-test BUNDLE\n";
    return 2;
  }
  try {
    const int kThreads = 4;
    vpsde::SamplerOptions options;
    options.threads = 1;
    vpsde::Sampler shared(argv[1], options);
    std::vector<std::vector<float>> want(kThreads), got(kThreads), own(kThreads);
    for (int k = 0; k < kThreads; ++k) want[k] = shared.sample(3, 100 + k, 2, 7 * k);
    std::vector<std::thread> threads;
    for (int k = 0; k < kThreads; ++k)
      threads.emplace_back([&, k] { got[k] = shared.sample(3, 100 + k, 2, 7 * k); });
    for (auto& t : threads) t.join();
    threads.clear();
    Ort::Env env(ORT_LOGGING_LEVEL_FATAL, "vpsde-thread-test");
    options.env = &env;
    for (int k = 0; k < kThreads; ++k)
      threads.emplace_back([&, k] {
        vpsde::Sampler mine(argv[1], options);
        own[k] = mine.sample(3, 100 + k, 3, 7 * k);
      });
    for (auto& t : threads) t.join();
    int bad = 0;
    for (int k = 0; k < kThreads; ++k) bad += (got[k] != want[k]) + (own[k] != want[k]);
    try {  // a progress callback that returns false cancels, and the Sampler stays usable
      shared.sample(3, 1, 0, 0, {}, [](int step, int) { return step < 2; });
      ++bad;
    } catch (const vpsde::Cancelled&) {
    }
    bad += shared.sample(3, 100, 2, 0) != want[0];
    std::cout << kThreads << " threads, " << bad << " mismatching results\n";
    return bad == 0 ? 0 : 1;
  } catch (const std::exception& e) {
    std::cerr << "vpsde-thread-test: error: " << e.what() << "\n";
    return 2;
  }
}
