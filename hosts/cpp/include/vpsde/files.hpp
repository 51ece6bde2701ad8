/// @file
/// A bundle is untrusted input: the files it names stay inside it, are read once (never through a final symlink,
/// never a FIFO), and outputs are written through locked temporaries that the next run sweeps if their writer
/// died. The same rules as vpsde/runtime/confine.py and vpsde/runtime/atomic.py.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace vpsde {

/// One path component of letters, digits, '_', '.', '-', not starting with '.' or '-' (at most 128 characters).
bool is_plain_name(const std::string& name);

/// root / relative with symlinks resolved, checked to lie inside root (also resolved); `what` names the field.
std::string inside(const std::string& root, const std::string& relative, const std::string& what);

/// The whole content of a regular file of at most `limit` bytes, opened without following a final symlink and
/// without blocking; a clear Error naming `what` otherwise.
std::string read_regular(const std::string& path, std::uint64_t limit, const std::string& what);

std::string sha256_hex(const std::string& data);

/// Remove `.<name>.vpsde-tmp-*` entries of `dir` whose writer is gone (their flock can be taken).
void sweep_stale(const std::string& dir, const std::string& name);

/// A temporary beside `path` (`.<name>.vpsde-tmp-XXXXXX`), locked while it lives; commit() renames it onto
/// `path`, the destructor removes it if not committed. Opening it first proves `path`'s directory writable
/// before any work is done.
class AtomicFile {
 public:
  explicit AtomicFile(const std::string& path);
  ~AtomicFile();
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;
  void write(const void* data, std::size_t size);  // appends; an Error (disk full, ...) names `path`
  void commit();
  const std::string& temp_path() const { return tmp_; }

 private:
  std::string path_, tmp_;
  int fd_ = -1;
  bool committed_ = false;
};

/// The path of the temporary being written now, if any, for a signal handler to unlink (async-signal-safe).
const char* pending_temporary();

}  // namespace vpsde
