/// @file
/// Portable host noise "philox4x32-10/box-muller/v1" (docs/DESIGN.md), header-only.
//
/// Key (k0, k1) = (seed mod 2^32, seed div 2^32). Element e of global sample s at noise call c uses the
/// Philox4x32-10 counter (e / 4, c, s mod 2^32, s div 2^32) and lane e mod 4 of the Box-Muller transform of
/// the four output words, computed in double and rounded to float. Same numbers as vpsde.runtime.noise.
#pragma once

#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>

namespace vpsde {

using PhiloxBlock = std::array<std::uint32_t, 4>;
using PhiloxKey = std::array<std::uint32_t, 2>;

/// Philox4x32 with 10 rounds, as in Random123.
inline PhiloxBlock philox4x32_10(PhiloxBlock c, PhiloxKey k) {
  constexpr std::uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u, kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k[0] += kW0;
      k[1] += kW1;
    }
    const std::uint64_t p0 = static_cast<std::uint64_t>(kM0) * c[0];
    const std::uint64_t p1 = static_cast<std::uint64_t>(kM1) * c[2];
    c = {static_cast<std::uint32_t>(p1 >> 32) ^ c[1] ^ k[0], static_cast<std::uint32_t>(p1),
         static_cast<std::uint32_t>(p0 >> 32) ^ c[3] ^ k[1], static_cast<std::uint32_t>(p0)};
  }
  return c;
}

/// Four standard normals from four words: (x0, x1) -> z0, z1 and (x2, x3) -> z2, z3.
inline std::array<double, 4> box_muller(const PhiloxBlock& w) {
  constexpr double kTwoPow32 = 4294967296.0;
  constexpr double kPi = 3.141592653589793;
  std::array<double, 4> z{};
  for (int pair = 0; pair < 2; ++pair) {
    const double u1 = (static_cast<double>(w[2 * pair]) + 1.0) / kTwoPow32;  // (0, 1]
    const double u2 = static_cast<double>(w[2 * pair + 1]) / kTwoPow32;
    const double r = std::sqrt(-2.0 * std::log(u1));
    const double theta = 2.0 * kPi * u2;
    z[2 * pair] = r * std::cos(theta);
    z[2 * pair + 1] = r * std::sin(theta);
  }
  return z;
}

/// Standard normals for one sample: out[0 .. n) of global sample `sample` at noise call `call`.
inline void philox_normal(std::uint64_t seed, std::uint32_t call, std::uint64_t sample, float* out, std::size_t n) {
  const PhiloxKey key{static_cast<std::uint32_t>(seed), static_cast<std::uint32_t>(seed >> 32)};
  for (std::size_t block = 0; 4 * block < n; ++block) {
    const auto z = box_muller(philox4x32_10(
        {static_cast<std::uint32_t>(block), call, static_cast<std::uint32_t>(sample), static_cast<std::uint32_t>(sample >> 32)}, key));
    for (std::size_t lane = 0; lane < 4 && 4 * block + lane < n; ++lane) out[4 * block + lane] = static_cast<float>(z[lane]);
  }
}

}  // namespace vpsde
