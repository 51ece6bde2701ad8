/// @file
/// Minimal .npy (format 1.0): a writer of float32 or float64 arrays (locked temporary file renamed into place) and
/// readers of float32, float64 (rounded to float32 as numpy's astype does) and uint8 ones (little-endian, C order;
/// anything else is an error naming the file).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "vpsde/files.hpp"
#include "vpsde/manifest.hpp"

namespace vpsde {

/// Writes float32 or float64 [shape] into `out` (a temporary that commit() renames into place).
template <typename T>
inline void write_npy(AtomicFile& out, const std::vector<T>& data, const std::vector<std::int64_t>& shape) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "float32 or float64 only");
  std::string dims;
  for (std::size_t i = 0; i < shape.size(); ++i) dims += std::to_string(shape[i]) + (shape.size() == 1 || i + 1 < shape.size() ? "," : "");
  std::string header = std::string("{'descr': '") + (sizeof(T) == 4 ? "<f4" : "<f8") +
                       "', 'fortran_order': False, 'shape': (" + dims + "), }";
  const std::size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header += '\n';
  const std::uint16_t hlen = static_cast<std::uint16_t>(header.size());
  out.write("\x93NUMPY\x01\x00", 8);
  out.write(&hlen, 2);  // little-endian hosts (x86-64, aarch64)
  out.write(header.data(), header.size());
  out.write(data.data(), data.size() * sizeof(T));
  out.commit();
}

/// An array read from a .npy file: its shape and its elements in C order.
template <typename T>
struct Npy {
  std::vector<std::int64_t> shape;
  std::vector<T> data;
};
using NpyArray = Npy<float>;
using NpyPixels = Npy<std::uint8_t>;  ///< uint8 images (a likelihood bundle's --data; dequantize.hpp makes them points)

namespace detail {

struct NpyHeader {
  std::string descr;  // '<f4', '|u1', ...
  std::vector<std::int64_t> shape;
  std::uint64_t count = 1;  // elements
};

/// Opens `path` and reads its header (the stream is left at the data): version 1, C order, a shape.
inline NpyHeader read_npy_header(std::ifstream& f, const std::string& path) {
  f.open(path, std::ios::binary);
  if (!f) throw Error(path + ": cannot open .npy for reading");
  char magic[8];
  std::uint16_t hlen = 0;
  f.read(magic, 8);
  f.read(reinterpret_cast<char*>(&hlen), 2);
  if (!f || std::string(magic, 6) != "\x93NUMPY" || magic[6] != 1)
    throw Error(path + ": not a version 1 .npy file");
  std::string header(hlen, ' ');
  f.read(header.data(), hlen);
  NpyHeader h;
  const std::string key = "'descr': '";
  const auto at = header.find(key);
  const auto stop = at == std::string::npos ? at : header.find('\'', at + key.size());
  if (stop == std::string::npos) throw Error(path + ": no dtype in the .npy header");
  h.descr = header.substr(at + key.size(), stop - at - key.size());
  if (header.find("'fortran_order': False") == std::string::npos) throw Error(path + ": expected C-order data");
  const auto open = header.find('('), close = header.find(')');
  if (open == std::string::npos || close == std::string::npos) throw Error(path + ": no shape in the .npy header");
  const std::string dims = header.substr(open + 1, close - open - 1);
  for (std::size_t pos = 0; pos < dims.size();) {
    const std::size_t comma = dims.find(',', pos);
    const std::string tok = dims.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
    if (tok.find_first_not_of(' ') != std::string::npos) {
      std::size_t used = 0;
      try {
        h.shape.push_back(std::stoll(tok, &used));
      } catch (const std::exception&) {
        used = 0;
      }
      if (used == 0 || tok.find_first_not_of(' ', used) != std::string::npos)
        throw Error(path + ": bad shape in the .npy header: (" + dims + ")");
      if (h.shape.back() < 0 || (h.shape.back() > 0 && h.count > (std::uint64_t{1} << 40) / h.shape.back()))
        throw Error(path + ": shape too large in the .npy header");
      h.count *= static_cast<std::uint64_t>(h.shape.back());
    }
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  return h;
}

/// The array of `path` if its dtype is `descr`, else an Error naming the file and `expected`.
template <typename T>
inline Npy<T> load_npy_as(const std::string& path, const std::string& descr, const std::string& expected) {
  std::ifstream f;
  const auto h = read_npy_header(f, path);
  if (h.descr != descr) throw Error(path + ": expected " + expected);
  const auto at = f.tellg();
  f.seekg(0, std::ios::end);
  const auto left = static_cast<std::uint64_t>(f.tellg() - at);
  f.seekg(at);
  if (left < h.count * sizeof(T)) throw Error(path + ": truncated .npy data");
  std::vector<T> data(static_cast<std::size_t>(h.count));
  f.read(reinterpret_cast<char*>(data.data()), static_cast<std::streamsize>(data.size() * sizeof(T)));
  if (!f) throw Error(path + ": truncated .npy data");
  return {h.shape, std::move(data)};
}

}  // namespace detail

/// The dtype of a .npy file as its header writes it ('<f4' float32, '|u1' uint8, ...).
inline std::string npy_descr(const std::string& path) {
  std::ifstream f;
  return detail::read_npy_header(f, path).descr;
}

/// float32 [shape] (little-endian, C order); anything else is an error naming the file.
inline NpyArray load_npy(const std::string& path) {
  return detail::load_npy_as<float>(path, "<f4", "float32 ('<f4') data; save it with numpy as float32");
}

/// float32 or float64 [shape] as float32 (each element rounded to nearest, as numpy's astype(float32): values past
/// float32's range become infinities, which the caller's finite check refuses); anything else is an error.
inline NpyArray load_npy_points(const std::string& path) {
  if (npy_descr(path) != "<f8") return load_npy(path);
  auto wide = detail::load_npy_as<double>(path, "<f8", "float64 ('<f8') data");
  NpyArray narrow{std::move(wide.shape), std::vector<float>(wide.data.size())};
  constexpr float kMax = std::numeric_limits<float>::max();
  constexpr double kOverflow = 0x1.ffffffp127;  // 2^128 - 2^103, halfway from kMax to 2^128: rounds to infinity
  std::transform(wide.data.begin(), wide.data.end(), narrow.data.begin(), [](double v) {
    const double a = std::fabs(v);
    if (a <= kMax || !std::isfinite(v)) return static_cast<float>(v);
    // beyond float's range a plain cast is undefined: round to nearest explicitly, as IEEE 754 (and numpy) does
    const float r = a >= kOverflow ? std::numeric_limits<float>::infinity() : kMax;
    return v > 0 ? r : -r;
  });
  return narrow;
}

/// uint8 [shape]; anything else is an error naming the file.
inline NpyPixels load_npy_pixels(const std::string& path) {
  return detail::load_npy_as<std::uint8_t>(path, "|u1", "uint8 ('|u1') images");
}

}  // namespace vpsde
