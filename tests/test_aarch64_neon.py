"""aarch64 for real: cross-compile the kernels and csrc/tests/quant_test.cpp with Debian's
aarch64-linux-gnu-g++, run it under qemu-aarch64, and check the NEON path against the same
reference vectors (onnxruntime outputs made on x86) as the native x86_64 build of the same
program. Both builds must also print the same digest over all their outputs.

Fails (never skips) when the cross compiler or qemu is missing: tools/test.sh installs them.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from edgefed import quant

pytestmark = pytest.mark.system  # cross-compiles and runs under qemu

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
VECTORS = CSRC / "tests" / "quant_vectors.txt"
FLAGS = ["-std=c++17", "-O2", "-pthread", "-Wall", "-Wextra", "-fno-math-errno",
         "-ffp-contract=off", f"-I{CSRC}"]  # fmt: skip
K = CSRC / "kernels"
COMMON = [K / "quantize_generic.cpp", K / "quantize_common.cpp", CSRC / "tests" / "quant_test.cpp"]


def _need(tool: str) -> str:
    path = shutil.which(tool)
    assert path, f"{tool} is missing: install g++-aarch64-linux-gnu and qemu-user (tools/test.sh)"
    return path


def _run(cmd: list[str], timeout: float = 240) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    assert res.returncode == 0, f"{cmd[0]} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    return res.stdout


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Native and aarch64 binaries, compiled concurrently (one per core)."""
    cross, gxx = _need("aarch64-linux-gnu-g++"), _need("g++")
    _need("qemu-aarch64")
    d = tmp_path_factory.mktemp("quant_test")
    x86, arm = d / "quant_test_x86", d / "quant_test_arm64"
    avx2 = [gxx, *FLAGS, "-DEDGEFED_X86=1", "-mavx2", "-mfma", "-c", str(K / "quantize_avx2.cpp"),
            "-o", str(d / "avx2.o")]  # fmt: skip
    isa512 = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
    avx512 = [gxx, *FLAGS, "-DEDGEFED_X86=1", *isa512, "-c", str(K / "quantize_avx512.cpp"),
              "-o", str(d / "avx512.o")]  # fmt: skip
    arm_cmd = [cross, *FLAGS, "-static", "-DEDGEFED_ARM64=1", *map(str, COMMON),
               str(K / "quantize_neon.cpp"), "-o", str(arm)]  # fmt: skip
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in (arm_cmd, avx2)]  # fmt: skip
    _run(avx512)
    for p, c in zip(procs, (arm_cmd, avx2), strict=True):
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, f"{c[0]} failed:\n{out}\n{err}"
    _run([gxx, *FLAGS, "-DEDGEFED_X86=1", *map(str, COMMON), str(K / "quantize_sse2.cpp"),
          str(d / "avx2.o"), str(d / "avx512.o"), "-o", str(x86)])  # fmt: skip
    return {"x86": x86, "arm": arm}


def _digest(out: str) -> str:
    m = re.search(r"^digest ([0-9a-f]{16})$", out, re.M)
    assert m, out
    return m.group(1)


def test_reference_vectors_are_current() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_vectors", CSRC / "tests" / "gen_vectors.py")
    assert spec and spec.loader
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)

    def body(text: str) -> list[str]:
        return [ln for ln in text.splitlines() if not ln.startswith("#")]

    assert body(gen.generate()) == body(VECTORS.read_text())


def test_neon_under_qemu_matches_x86_reference(builds: dict[str, Path]) -> None:
    native = _run([str(builds["x86"]), str(VECTORS)])
    assert native.rstrip().endswith("ALL OK"), native
    for isa in quant.available_isas():  # the program saw the same ISAs as the module
        assert f"isa {isa}: ok" in native
    assert f"best {quant.best_isa()}" in native
    arm = _run([_need("qemu-aarch64"), str(builds["arm"]), str(VECTORS)])
    assert "isa generic: ok" in arm and "isa neon: ok" in arm and "best neon" in arm, arm
    assert arm.rstrip().endswith("ALL OK"), arm
    assert _digest(arm) == _digest(native)
