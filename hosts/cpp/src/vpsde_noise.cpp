// vpsde-noise: the portable noise on its own, for cross-checks against the Python runtime.
//   vpsde-noise --kat FILE.json                                     check Philox4x32-10 known-answer vectors
//   vpsde-noise --seed S --call C --first-sample K --num N --numel E --out z.npy     dump normals [N, E]
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "vpsde/npy.hpp"
#include "vpsde/philox.hpp"

int main(int argc, char** argv) {
  try {
    std::string kat, out;
    std::uint64_t seed = 0, first = 0, num = 0, numel = 0, call = 0;
    for (int i = 1; i + 1 < argc; i += 2) {
      const std::string a = argv[i], v = argv[i + 1];
      if (a == "--kat") kat = v;
      else if (a == "--out") out = v;
      else if (a == "--seed") seed = std::stoull(v, nullptr, 0);
      else if (a == "--call") call = std::stoull(v, nullptr, 0);
      else if (a == "--first-sample") first = std::stoull(v, nullptr, 0);
      else if (a == "--num") num = std::stoull(v, nullptr, 0);
      else if (a == "--numel") numel = std::stoull(v, nullptr, 0);
      else throw vpsde::Error("unknown option " + a);
    }
    if (!kat.empty()) {
      std::ifstream in(kat);
      if (!in) throw vpsde::Error(kat + ": cannot open");
      const auto doc = nlohmann::json::parse(in);
      int failures = 0, n = 0;
      auto word = [](const nlohmann::json& s) { return static_cast<std::uint32_t>(std::stoul(s.get<std::string>(), nullptr, 16)); };
      for (const auto& v : doc.at("vectors")) {
        vpsde::PhiloxBlock c{word(v["counter"][0]), word(v["counter"][1]), word(v["counter"][2]), word(v["counter"][3])};
        const auto got = vpsde::philox4x32_10(c, {word(v["key"][0]), word(v["key"][1])});
        for (int k = 0; k < 4; ++k) failures += got[k] != word(v["output"][k]);
        ++n;
      }
      std::cout << n << " vectors, " << failures << " mismatching words\n";
      return failures ? 1 : 0;
    }
    if (out.empty() || num == 0 || numel == 0) throw vpsde::Error("need --kat FILE, or --out, --num and --numel");
    std::vector<float> z(num * numel);
    for (std::uint64_t s = 0; s < num; ++s) vpsde::philox_normal(seed, static_cast<std::uint32_t>(call), first + s, z.data() + s * numel, numel);
    vpsde::AtomicFile file(out);
    vpsde::write_npy(file, z, {static_cast<std::int64_t>(num), static_cast<std::int64_t>(numel)});
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "vpsde-noise: error: " << e.what() << "\n";
    return 2;
  }
}
