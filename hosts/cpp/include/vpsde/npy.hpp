/// @file
/// Minimal .npy (format 1.0): a writer of float32 or float64 arrays (locked temporary file renamed into place) and a
/// reader of float32 ones (little-endian, C order; anything else is an error naming the file).
#pragma once

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <type_traits>
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

struct NpyArray {
  std::vector<std::int64_t> shape;
  std::vector<float> data;
};

inline NpyArray load_npy(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Error(path + ": cannot open .npy for reading");
  char magic[8];
  std::uint16_t hlen = 0;
  f.read(magic, 8);
  f.read(reinterpret_cast<char*>(&hlen), 2);
  if (!f || std::string(magic, 6) != "\x93NUMPY" || magic[6] != 1)
    throw Error(path + ": not a version 1 .npy file");
  std::string header(hlen, ' ');
  f.read(header.data(), hlen);
  if (header.find("'descr': '<f4'") == std::string::npos)
    throw Error(path + ": expected float32 ('<f4') data; save it with numpy as float32");
  if (header.find("'fortran_order': False") == std::string::npos) throw Error(path + ": expected C-order data");
  const auto open = header.find('('), close = header.find(')');
  if (open == std::string::npos || close == std::string::npos) throw Error(path + ": no shape in the .npy header");
  NpyArray a;
  std::int64_t n = 1;
  std::string dims = header.substr(open + 1, close - open - 1);
  for (std::size_t pos = 0; pos < dims.size();) {
    const std::size_t comma = dims.find(',', pos);
    const std::string tok = dims.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
    if (tok.find_first_not_of(' ') != std::string::npos) {
      a.shape.push_back(std::stoll(tok));
      n *= a.shape.back();
    }
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  a.data.resize(static_cast<std::size_t>(n));
  f.read(reinterpret_cast<char*>(a.data.data()), static_cast<std::streamsize>(a.data.size() * sizeof(float)));
  if (!f) throw Error(path + ": truncated .npy data");
  return a;
}

}  // namespace vpsde
