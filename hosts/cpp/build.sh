#!/usr/bin/env bash
# Build the C++ host into build/cpp (from the repository root): dependencies, configure, compile.
#   PYTHON=.venv/bin/python bash hosts/cpp/build.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
ort=$(bash hosts/cpp/prepare_deps.sh build/ort)
cmake -S hosts/cpp -B build/cpp -DONNXRUNTIME_ROOT="$ort" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build/cpp -j "${JOBS:-2}" >/dev/null
echo build/cpp
