#include "vpsde/files.hpp"

#include <fcntl.h>
#include <openssl/evp.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <iomanip>
#include <memory>
#include <sstream>

#include "vpsde/manifest.hpp"

namespace fs = std::filesystem;

namespace vpsde {
namespace {

const char kTmpTag[] = ".vpsde-tmp-";
char g_pending[4096] = {0};  // the temporary being written, for the signal handler

bool within(const fs::path& base, const fs::path& p) {
  auto b = base.begin(), q = p.begin();
  for (; b != base.end(); ++b, ++q)
    if (q == p.end() || *b != *q) return false;
  return true;
}

}  // namespace

bool is_plain_name(const std::string& name) {
  if (name.empty() || name.size() > 128) return false;
  const unsigned char first = static_cast<unsigned char>(name[0]);
  if (!(std::isalnum(first) || first == '_')) return false;
  for (unsigned char c : name)
    if (!(std::isalnum(c) || c == '_' || c == '.' || c == '-') || c > 127) return false;
  return true;
}

std::string inside(const std::string& root, const std::string& relative, const std::string& what) {
  const fs::path rel(relative);
  bool climbs = rel.empty() || rel.is_absolute();
  for (const auto& part : rel) climbs = climbs || part == "..";
  if (climbs) throw Error(what + ": expected a path inside the bundle, got '" + relative + "'");
  std::error_code ec;
  const fs::path base = fs::canonical(root, ec);
  if (ec) throw Error(root + ": cannot resolve the bundle directory: " + ec.message());
  const fs::path real = fs::weakly_canonical(base / rel, ec);
  if (ec) throw Error((fs::path(root) / rel).string() + ": cannot resolve: " + ec.message());
  if (!within(base, real))
    throw Error(what + ": " + (fs::path(root) / rel).string() +
                " is a symlink that leaves the bundle; a bundle's files must lie inside its directory");
  return real.string();
}

std::string read_regular(const std::string& path, std::uint64_t limit, const std::string& what) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) throw Error(path + ": " + what + " is missing");
    if (errno == ELOOP) throw Error(path + ": " + what + " is a symlink; expected a regular file");
    throw Error(path + ": cannot open " + what + ": " + std::strerror(errno));
  }
  std::unique_ptr<int, void (*)(int*)> guard(new int(fd), [](int* f) { ::close(*f); delete f; });
  struct stat st {};
  if (::fstat(fd, &st) != 0) throw Error(path + ": cannot stat " + what + ": " + std::strerror(errno));
  if (!S_ISREG(st.st_mode))
    throw Error(path + ": " + what + " is " +
                (S_ISDIR(st.st_mode) ? "a directory" : S_ISFIFO(st.st_mode) ? "a FIFO" : "not a regular file") +
                "; expected a regular file");
  if (static_cast<std::uint64_t>(st.st_size) > limit)
    throw Error(path + ": " + what + " is " + std::to_string(st.st_size) + " bytes; at most " + std::to_string(limit) +
                " are accepted");
  std::string data;
  data.reserve(static_cast<std::size_t>(st.st_size));
  char buf[1 << 16];
  for (;;) {
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw Error(path + ": cannot read " + what + ": " + std::strerror(errno));
    }
    if (n == 0) break;
    data.append(buf, static_cast<std::size_t>(n));
    if (data.size() > limit) throw Error(path + ": " + what + " is over " + std::to_string(limit) + " bytes");
  }
  return data;
}

std::string sha256_hex(const std::string& data) {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  EVP_Digest(data.data(), data.size(), digest, &len, EVP_sha256(), nullptr);
  std::ostringstream hex;
  for (unsigned int i = 0; i < len; ++i) hex << std::hex << std::setw(2) << std::setfill('0') << static_cast<int>(digest[i]);
  return hex.str();
}

void sweep_stale(const std::string& dir, const std::string& name) {
  const std::string prefix = "." + name + kTmpTag;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(dir.empty() ? "." : dir, ec)) {
    const std::string file = entry.path().filename().string();
    if (file.compare(0, prefix.size(), prefix) != 0) continue;
    const int fd = ::open(entry.path().c_str(), O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) continue;
    struct stat st {};
    if (::flock(fd, LOCK_EX | LOCK_NB) == 0 && ::fstat(fd, &st) == 0 && S_ISREG(st.st_mode))
      ::unlink(entry.path().c_str());  // its writer is gone
    ::close(fd);
  }
}

AtomicFile::AtomicFile(const std::string& path) : path_(path) {
  const fs::path p(path);
  std::error_code ec;
  if (fs::is_directory(p, ec)) throw Error(path + ": is a directory; --out names the .npy file to write");
  const std::string dir = p.parent_path().empty() ? "." : p.parent_path().string();
  if (!fs::is_directory(dir, ec)) throw Error(path + ": its directory " + dir + " does not exist");
  sweep_stale(dir, p.filename().string());
  for (;;) {
    std::string templ = (fs::path(dir) / ("." + p.filename().string() + kTmpTag + "XXXXXX")).string();
    fd_ = ::mkstemp(templ.data());
    if (fd_ < 0) throw Error(path + ": cannot write there: " + std::strerror(errno));
    ::flock(fd_, LOCK_EX);
    struct stat st {};
    if (::fstat(fd_, &st) == 0 && st.st_nlink > 0) {  // not swept between creation and locking
      tmp_ = templ;
      break;
    }
    ::close(fd_);
  }
  ::fchmod(fd_, 0644);
  if (tmp_.size() < sizeof g_pending) std::memcpy(g_pending, tmp_.c_str(), tmp_.size() + 1);
}

AtomicFile::~AtomicFile() {
  if (!committed_) ::unlink(tmp_.c_str());
  g_pending[0] = '\0';
  if (fd_ >= 0) ::close(fd_);
}

void AtomicFile::write(const void* data, std::size_t size) {
  const char* p = static_cast<const char*>(data);
  while (size > 0) {
    const ssize_t n = ::write(fd_, p, size);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw Error(path_ + ": write failed: " + std::strerror(errno) + " (nothing half-written was left)");
    }
    p += n;
    size -= static_cast<std::size_t>(n);
  }
}

void AtomicFile::commit() {
  if (::fsync(fd_) != 0) throw Error(path_ + ": write failed: " + std::strerror(errno) + " (nothing half-written was left)");
  if (::rename(tmp_.c_str(), path_.c_str()) != 0) throw Error(path_ + ": cannot rename into place: " + std::strerror(errno));
  committed_ = true;
}

const char* pending_temporary() { return g_pending; }

}  // namespace vpsde
