#!/usr/bin/env bash
# Prepare the C++ host's dependencies as CMake package prefixes, without touching the system (no apt-get install,
# no system paths written; root not needed):
#   DEST/onnxruntime  ONNX Runtime in the layout of its release archives: include/*.h (Debian trixie's
#                     libonnxruntime-dev headers, downloaded and unpacked here), lib/libonnxruntime.so.* and any
#                     provider libraries (libonnxruntime_providers_*.so) copied from the onnxruntime wheel of
#                     $PYTHON, and lib/cmake/onnxruntime/onnxruntimeConfig.cmake (target onnxruntime::onnxruntime).
#                     The C API is versioned and backward compatible: the 1.21 headers work with a newer library.
#   DEST/nlohmann     nlohmann-json (Debian's nlohmann-json3-dev, downloaded and unpacked here), with its CMake config.
# Prints the CMAKE_PREFIX_PATH that finds both. With an official ONNX Runtime release archive (or a vcpkg/conan
# package), point CMAKE_PREFIX_PATH (or -DONNXRUNTIME_ROOT) at it instead.
set -euo pipefail
DEST=${1:-build/deps}
PYTHON=${PYTHON:-python3}
mkdir -p "$DEST"
DEST=$(cd "$DEST" && pwd)
ORT="$DEST/onnxruntime"
JSON="$DEST/nlohmann"

need_headers=0; [ -f "$ORT/include/onnxruntime_cxx_api.h" ] || need_headers=1
need_json=0; [ -f "$JSON/usr/include/nlohmann/json.hpp" ] || need_json=1
if [ $need_headers = 1 ] || [ $need_json = 1 ]; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  mkdir -p "$work/lists/partial" "$work/dl"
  echo "deb http://deb.debian.org/debian trixie main" > "$work/sources.list"
  apt_opts=(-q -o Dir::Etc::SourceList="$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
            -o Dir::State::Lists="$work/lists" -o Dir::Cache="$work/cache" -o APT::Sandbox::User=root)
  echo "downloading Debian packages (unpacked locally): libonnxruntime-dev headers, nlohmann-json3-dev" >&2
  apt-get "${apt_opts[@]}" update >/dev/null
  (cd "$work/dl" && apt-get "${apt_opts[@]}" download libonnxruntime-dev nlohmann-json3-dev >/dev/null)
  if [ $need_headers = 1 ]; then
    dpkg-deb -x "$work"/dl/libonnxruntime-dev_*.deb "$work/ort"
    mkdir -p "$ORT/include"
    cp "$work"/ort/usr/include/onnxruntime/*.h "$ORT/include/"
  fi
  if [ $need_json = 1 ]; then
    rm -rf "$JSON" && mkdir -p "$JSON"
    dpkg-deb -x "$work"/dl/nlohmann-json3-dev_*.deb "$JSON"
  fi
fi

# The library and its provider libraries, copied (not linked) so that the prefix outlives the Python environment.
# Only when they differ, and through a rename: a host running from this prefix keeps the library mapped, and
# overwriting it in place (cp -f truncates the same file) kills that process with SIGBUS.
install_lib() {
  local dst="$2/$(basename "$1")"
  cmp -s "$1" "$dst" && return 0
  cp "$1" "$dst.tmp.$$" && mv -f "$dst.tmp.$$" "$dst"
}
capi=$("$PYTHON" -c 'import os, onnxruntime as o; print(os.path.join(os.path.dirname(o.__file__), "capi"))')
version=$("$PYTHON" -c 'import onnxruntime as o; print(o.__version__)')
lib=$(ls "$capi"/libonnxruntime.so.* | head -1)
mkdir -p "$ORT/lib/cmake/onnxruntime"
install_lib "$lib" "$ORT/lib"
name=$(basename "$lib")
for link in libonnxruntime.so.1 libonnxruntime.so; do  # .so.1: the SONAME the loader looks for
  [ "$(readlink "$ORT/lib/$link" 2>/dev/null)" = "$name" ] || ln -sf "$name" "$ORT/lib/$link"
done
for p in "$capi"/libonnxruntime_providers_*.so; do
  [ -e "$p" ] && install_lib "$p" "$ORT/lib"
done

cat > "$ORT/lib/cmake/onnxruntime/onnxruntimeConfig.cmake" <<EOF
# ONNX Runtime $version (library from the Python wheel, headers from Debian), laid out by vpsde's prepare_deps.sh.
get_filename_component(_ort_prefix "\${CMAKE_CURRENT_LIST_DIR}/../../.." ABSOLUTE)
if(NOT TARGET onnxruntime::onnxruntime)
  add_library(onnxruntime::onnxruntime SHARED IMPORTED)
  set_target_properties(onnxruntime::onnxruntime PROPERTIES
    IMPORTED_LOCATION "\${_ort_prefix}/lib/libonnxruntime.so.1"
    IMPORTED_SONAME "libonnxruntime.so.1"
    INTERFACE_INCLUDE_DIRECTORIES "\${_ort_prefix}/include")
endif()
set(onnxruntime_FOUND TRUE)
EOF
cat > "$ORT/lib/cmake/onnxruntime/onnxruntimeConfigVersion.cmake" <<EOF
set(PACKAGE_VERSION "$version")
if(PACKAGE_FIND_VERSION VERSION_GREATER PACKAGE_VERSION)
  set(PACKAGE_VERSION_COMPATIBLE FALSE)
else()
  set(PACKAGE_VERSION_COMPATIBLE TRUE)
endif()
EOF
echo "$ORT;$JSON/usr"
