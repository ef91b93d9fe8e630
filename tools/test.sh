#!/usr/bin/env bash
# The test command (README, .ci/run): installs everything the tests need on a fresh
# Debian machine, then runs the linters and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
# mosquitto: the real broker the tests start; the aarch64 cross compiler and qemu-user:
# the NEON kernels are built and checked under emulation; openssl: test CA for TLS tests;
# debootstrap, qemu-user-static, binfmt-support, zstd: the emulated arm64 Debian device
# (tests/test_arm64_device.py; its root is cached under /var/cache/edgefed-arm64-root);
# python3-venv: tools/build-wheels.sh keeps auditwheel in a venv of its own;
# iproute2: network namespaces, veth and tc for the constrained-link tests.
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends \
  mosquitto mosquitto-clients g++ cmake ninja-build g++-aarch64-linux-gnu qemu-user openssl \
  debootstrap qemu-user-static binfmt-support zstd python3-venv iproute2
# The device's aarch64 programs run through binfmt_misc: mount it where the machine has not,
# and register qemu-aarch64 (idempotent; a no-op when systemd-binfmt already did it).
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
  $SUDO mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
$SUDO update-binfmts --enable qemu-aarch64

python3 -m pip install --upgrade-strategy only-if-needed ".[test]"

ruff check edgefed device_agent tests benchmarks tools
# Run from tests/ so that neither pytest nor the `python -m edgefed ...` subprocesses the
# tests start put the source folder (which has no compiled _core) ahead of the installed
# package on sys.path.
cd tests
pytest -c ../pyproject.toml --rootdir=.. -p no:cacheprovider "$@" .
