#!/usr/bin/env bash
# Developer build: compiles edgefed._core into build/dev and copies it next to the
# sources, so `PYTHONPATH=$PWD pytest` uses the fresh module. A lock keeps two
# concurrent builds from trampling each other.
set -euo pipefail
cd "$(dirname "$0")/.."
exec 9>/tmp/edgefed-devbuild.lock
flock 9
py=${PYTHON:-python3}
if [ ! -f build/dev/CMakeCache.txt ]; then
  cmake -S . -B build/dev -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DSKBUILD_PROJECT_NAME=edgefed -DSKBUILD_PROJECT_VERSION=0.1.0 \
    -Dpybind11_DIR="$($py -m pybind11 --cmakedir)" -DPython_EXECUTABLE="$(command -v $py)" >/dev/null
fi
cmake --build build/dev -j2
# Replace by rename, never cp over the file: overwriting the inode in place kills every running
# process that has the module mapped (SIGBUS, seen in parallel test runs).
for so in build/dev/_core*.so; do
  cp -f "$so" "edgefed/.$(basename "$so").tmp"
  mv -f "edgefed/.$(basename "$so").tmp" "edgefed/$(basename "$so")"
done
