#!/usr/bin/env bash
# The test command (README, .ci/run): installs everything the tests need on a fresh
# Debian machine, then runs the linters and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
# mosquitto: the real broker the tests start; the aarch64 cross compiler and qemu-user:
# the NEON kernels are built and checked under emulation; openssl: test CA for TLS tests.
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends \
  mosquitto mosquitto-clients g++ cmake ninja-build g++-aarch64-linux-gnu qemu-user openssl iproute2

python3 -m pip install --upgrade-strategy only-if-needed ".[test]"

ruff check edgefed device_agent tests benchmarks tools
# Run from tests/ so that neither pytest nor the `python -m edgefed ...` subprocesses the
# tests start put the source folder (which has no compiled _core) ahead of the installed
# package on sys.path.
cd tests
pytest -c ../pyproject.toml --rootdir=.. -p no:cacheprovider "$@" .
