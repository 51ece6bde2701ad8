#!/usr/bin/env bash
# Build the C++ host into build/cpp (from the repository root): dependency prefixes (build/deps, nothing installed
# on the system), configure, compile. Install it with: cmake --install build/cpp --prefix PREFIX
#   PYTHON=.venv/bin/python bash hosts/cpp/build.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p build
if command -v flock >/dev/null; then exec 9>build/.cpp-build.lock; flock 9; fi  # one build at a time in build/
prefixes=$(bash hosts/cpp/prepare_deps.sh build/deps)
cmake -S hosts/cpp -B build/cpp -DCMAKE_PREFIX_PATH="$prefixes" -DCMAKE_BUILD_TYPE=Release ${VPSDE_TEST_BUNDLE:+-DVPSDE_TEST_BUNDLE="$VPSDE_TEST_BUNDLE"} >/dev/null
cmake --build build/cpp -j "${JOBS:-2}" >/dev/null
echo build/cpp
