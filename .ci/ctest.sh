#!/usr/bin/env bash
# Configure, build and run the C++ unit tests (ctest) in a temporary build directory.
#   .ci/ctest.sh            (PYTHON=/path/to/python to pick the interpreter whose torch is built against)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
BUILD="$(mktemp -d "${TMPDIR:-/tmp}/mvloss-ctest.XXXXXX")"
trap 'rm -rf "$BUILD"' EXIT
JOBS="${MAX_JOBS:-$(nproc 2>/dev/null || echo 2)}"
GEN=()
if command -v ninja >/dev/null 2>&1; then GEN=(-G Ninja); fi
cmake -S "$ROOT" -B "$BUILD" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$PYTHON"
cmake --build "$BUILD" -j "$JOBS"
ctest --test-dir "$BUILD" --output-on-failure -j "$JOBS"
