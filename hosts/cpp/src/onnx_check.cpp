// Refuse ONNX graphs that keep tensors as external data. ONNX Runtime resolves the `location` of a model loaded
// from bytes against the process's working directory (measured with onnxruntime 1.32: "allowed directory: ."),
// so a bundle graph with external data would read a file that no sha256 covers. vpsde export never writes
// external data; this walks the protobuf wire format of the checked bytes (no libprotobuf needed) and refuses any
// TensorProto with data_location = EXTERNAL or external_data entries, in every graph, subgraph and function.
#include <cstdint>
#include <string>

#include "vpsde/manifest.hpp"

namespace vpsde {
namespace {

enum Message { kModel, kGraph, kNode, kAttribute, kTensor, kSparseTensor, kFunction, kOther };

struct Walker {
  const std::string& path;
  const std::string& key;

  [[noreturn]] void fail(const std::string& what) const {
    throw Error(path + ": graph '" + key + "' " + what);
  }

  // The message type of field `field` (length-delimited) inside a message of type `in`, or kOther.
  static Message child(Message in, std::uint64_t field) {
    switch (in) {
      case kModel: return field == 7 ? kGraph : field == 25 ? kFunction : kOther;
      case kGraph: return field == 1 ? kNode : field == 5 ? kTensor : field == 15 ? kSparseTensor : kOther;
      case kNode: return field == 5 ? kAttribute : kOther;
      case kAttribute:
        return field == 5 || field == 10 ? kTensor : field == 6 || field == 11 ? kGraph
               : field == 22 || field == 23 ? kSparseTensor : kOther;
      case kSparseTensor: return field == 1 || field == 2 ? kTensor : kOther;
      case kFunction: return field == 7 ? kNode : kOther;
      default: return kOther;
    }
  }

  std::uint64_t varint(const unsigned char*& p, const unsigned char* end) const {
    std::uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (p >= end) fail("is not an ONNX model (truncated protobuf)");
      const unsigned char b = *p++;
      v |= static_cast<std::uint64_t>(b & 0x7f) << shift;
      if (!(b & 0x80)) return v;
    }
    fail("is not an ONNX model (bad varint)");
  }

  void walk(const unsigned char* p, const unsigned char* end, Message type, int depth) const {
    if (depth > 64) fail("nests messages more than 64 deep");
    while (p < end) {
      const std::uint64_t tag = varint(p, end), field = tag >> 3;
      switch (tag & 7) {
        case 0: {
          const std::uint64_t value = varint(p, end);
          if (type == kTensor && field == 14 && value == 1)
            fail("keeps a tensor as external data; a bundle's graphs must be self-contained: re-export the bundle");
          break;
        }
        case 1: if (end - p < 8) fail("is not an ONNX model (truncated protobuf)"); p += 8; break;
        case 5: if (end - p < 4) fail("is not an ONNX model (truncated protobuf)"); p += 4; break;
        case 2: {
          const std::uint64_t n = varint(p, end);
          if (n > static_cast<std::uint64_t>(end - p)) fail("is not an ONNX model (truncated protobuf)");
          if (type == kTensor && field == 13)
            fail("keeps a tensor as external data; a bundle's graphs must be self-contained: re-export the bundle");
          const Message sub = child(type, field);
          if (sub != kOther) walk(p, p + n, sub, depth + 1);
          p += n;
          break;
        }
        default: fail("is not an ONNX model (unsupported protobuf wire type)");
      }
    }
  }
};

}  // namespace

void check_self_contained(const std::string& bytes, const std::string& path, const std::string& key) {
  const auto* p = reinterpret_cast<const unsigned char*>(bytes.data());
  Walker{path, key}.walk(p, p + bytes.size(), kModel, 0);
}

}  // namespace vpsde
