#!/usr/bin/env bash
# Prepare what the C++ host builds against, without touching the system's package sources:
#   - nlohmann-json (Debian's nlohmann-json3-dev, installed with apt-get if missing; needs root);
#   - ONNX Runtime's C/C++ headers from Debian trixie's libonnxruntime-dev (downloaded, unpacked locally);
#   - libonnxruntime.so from the onnxruntime Python wheel of the interpreter given as $PYTHON.
# Result: $DEST/include/*.h and $DEST/lib/libonnxruntime.so — the layout of ONNX Runtime's release
# archives, for cmake -DONNXRUNTIME_ROOT=$DEST. The C API is versioned and backward compatible, so the
# 1.21 headers work against a newer library.
set -euo pipefail
DEST=${1:-build/ort}
PYTHON=${PYTHON:-python3}
mkdir -p "$DEST/include" "$DEST/lib"
DEST=$(cd "$DEST" && pwd)

if ! [ -f /usr/include/nlohmann/json.hpp ]; then
  echo "installing nlohmann-json3-dev" >&2
  (apt-get install -y -q nlohmann-json3-dev >/dev/null 2>&1) || { apt-get update -q >/dev/null && apt-get install -y -q nlohmann-json3-dev >/dev/null; }
fi

if ! [ -f "$DEST/include/onnxruntime_cxx_api.h" ]; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  mkdir -p "$work/lists/partial" "$work/dl"
  echo "deb http://deb.debian.org/debian trixie main" > "$work/sources.list"
  apt_opts=(-q -o Dir::Etc::SourceList="$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
            -o Dir::State::Lists="$work/lists" -o APT::Sandbox::User=root)
  echo "downloading ONNX Runtime headers (Debian trixie libonnxruntime-dev)" >&2
  apt-get "${apt_opts[@]}" update >/dev/null
  (cd "$work/dl" && apt-get "${apt_opts[@]}" download libonnxruntime-dev >/dev/null)
  dpkg-deb -x "$work"/dl/libonnxruntime-dev_*.deb "$work/x"
  cp "$work"/x/usr/include/onnxruntime/*.h "$DEST/include/"
fi

lib=$("$PYTHON" -c 'import glob, os, onnxruntime as o; print(sorted(glob.glob(os.path.join(os.path.dirname(o.__file__), "capi", "libonnxruntime.so*")))[0])')
ln -sf "$lib" "$DEST/lib/libonnxruntime.so"
ln -sf "$lib" "$DEST/lib/libonnxruntime.so.1"  # the SONAME the loader looks for
echo "$DEST"
