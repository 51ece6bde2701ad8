/// @file
/// uint8 images to a likelihood bundle's points, as vpsde.runtime.likelihood.dequantize (score_sde's uniform
/// dequantization, docs/likelihood.md "Data conventions"), header-only.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "vpsde/philox.hpp"

namespace vpsde {

/// pixels uint8 [num, numel] -> float32 [num, numel]: pixel k -> lo + (hi - lo) (k + u) / 256 with u = Phi(z),
/// z element e of noise call 0 of sample first_sample + i. Double arithmetic rounded once; std::erf is the C
/// library's, as Python's math.erf, so the points equal the Python runtime's bit for bit.
inline std::vector<float> dequantize(const std::uint8_t* pixels, std::int64_t num, std::int64_t numel, double lo,
                                     double hi, std::uint64_t seed, std::uint64_t first_sample) {
  const auto n = static_cast<std::size_t>(numel);
  std::vector<float> points(static_cast<std::size_t>(num) * n), z(n);
  const double root2 = std::sqrt(2.0);
  for (std::int64_t i = 0; i < num; ++i) {
    philox_normal(seed, 0, first_sample + static_cast<std::uint64_t>(i), z.data(), n);
    const std::size_t row = static_cast<std::size_t>(i) * n;
    for (std::size_t e = 0; e < n; ++e) {
      const double u = 0.5 * (1.0 + std::erf(static_cast<double>(z[e]) / root2));
      points[row + e] = static_cast<float>(lo + (hi - lo) * (static_cast<double>(pixels[row + e]) + u) / 256.0);
    }
  }
  return points;
}

}  // namespace vpsde
