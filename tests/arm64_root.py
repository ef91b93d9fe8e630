"""An emulated Debian 12 (bookworm) arm64 root for system tests: the userland of a 64-bit
Raspberry Pi OS device, run under qemu-user-static through binfmt_misc.

Building one with debootstrap takes minutes, so it is cached as a zstd tarball under
``CACHE`` (outside the repository), keyed by everything that goes into it (suite,
architecture, variant, package list, recipe version); each test unpacks a fresh copy, so
nothing a test does leaks into the next run. debootstrap's .deb downloads and a wheelhouse of
the aarch64 dependency wheels (downloaded once by the root's own pip, keyed by the dependency
list) live in the same folder, so a warm run needs no network. Traps handled here: /sys is
never mounted (onnxruntime's CPU detection reads the host's x86 sysfs and segfaults
under qemu); the root's pip sees none of the host's pip configuration (the host indexes hold
x86 wheels only) but its CA bundle, so it installs aarch64 wheels from the default index.

Every failure is an AssertionError naming the missing tool or the failed command.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

CACHE = Path(os.environ.get("EDGEFED_ARM64_CACHE", "/var/cache/edgefed-arm64-root"))
SUITE, ARCH, VARIANT = "bookworm", "arm64", "minbase"
# What a Raspberry Pi OS Lite install has and the agent needs: Python with venv and the CA
# certificates pip uses. No compiler: the agent installs from the aarch64 wheel.
PACKAGES = ("python3", "python3-venv", "ca-certificates")
RECIPE = 1  # bump when the way the root is made changes
COMPILERS = ("cc", "c++", "gcc", "g++", "clang", "clang++", "aarch64-linux-gnu-gcc",
             "aarch64-linux-gnu-g++")  # fmt: skip
ROOT_DIR = Path(__file__).resolve().parents[1]
WHEELHOUSE = "/var/cache/edgefed-wheels"  # in the root: a bind of CACHE / "wheels"


def cache_key() -> str:
    text = f"{SUITE} {ARCH} {VARIANT} {','.join(sorted(PACKAGES))} recipe {RECIPE}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _need(tool: str, package: str) -> str:
    path = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")
    assert path, f"{tool} is missing: apt-get install {package} (tools/test.sh installs it)"
    return path


def _run(cmd: Sequence[str], timeout: float, **kw: object) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False,
                         **kw)  # type: ignore[call-overload]  # fmt: skip
    assert res.returncode == 0, (
        f"{' '.join(map(str, cmd))} failed ({res.returncode}):\n{res.stdout[-4000:]}\n"
        f"{res.stderr[-4000:]}"
    )
    return res


def check_host() -> None:
    """Root, the tools, and qemu-aarch64 registered with binfmt_misc (flag F: the root needs
    no copy of qemu)."""
    assert os.geteuid() == 0, "the emulated arm64 device needs root (debootstrap, chroot, mount)"
    _need("debootstrap", "debootstrap")
    _need("zstd", "zstd")
    _need("qemu-aarch64-static", "qemu-user-static")
    reg = Path("/proc/sys/fs/binfmt_misc/qemu-aarch64")
    assert reg.exists(), (
        "qemu-aarch64 is not registered in /proc/sys/fs/binfmt_misc: run tools/test.sh (mounts "
        "binfmt_misc and runs update-binfmts --enable qemu-aarch64)"
    )
    text = reg.read_text()
    assert text.startswith("enabled"), f"binfmt qemu-aarch64 is not enabled:\n{text}"


def debian_mirror() -> str:
    return _run(["bash", str(ROOT_DIR / "tools" / "debian-mirror.sh")], 30).stdout.strip()


def cached_root_tarball() -> tuple[Path, float]:
    """The cached root tarball, built first when missing; returns it and the seconds spent
    building (0 when it was cached). One builder at a time (a lock in the cache folder)."""
    check_host()
    CACHE.mkdir(parents=True, exist_ok=True)
    tarball = CACHE / f"root-{cache_key()}.tar.zst"
    with open(CACHE / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if tarball.exists():
            return tarball, 0.0
        t0 = time.monotonic()
        stage = CACHE / f"stage-{cache_key()}"
        if stage.exists():
            shutil.rmtree(stage)
        debs = CACHE / "debs"
        debs.mkdir(exist_ok=True)
        _run([_need("debootstrap", "debootstrap"), f"--arch={ARCH}", f"--variant={VARIANT}",
              f"--include={','.join(PACKAGES)}", f"--cache-dir={debs}", SUITE, str(stage),
              debian_mirror()], timeout=1800)  # fmt: skip
        for sub in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for f in (stage / sub).glob("*"):
                if f.is_file():
                    f.unlink()
        tmp = tarball.with_suffix(".tmp")
        _run(["tar", "-C", str(stage), "--numeric-owner", "-I", "zstd -T0 -3", "-cf",
              str(tmp), "."], timeout=900)  # fmt: skip
        os.replace(tmp, tarball)
        shutil.rmtree(stage)
        return tarball, time.monotonic() - t0


def _mounted(path: Path) -> bool:
    target = str(path.resolve())
    with open("/proc/mounts") as f:
        return any(line.split()[1] == target for line in f)


@contextlib.contextmanager
def device_root(where: Path) -> Iterator[Path]:
    """A fresh copy of the cached root at ``where`` with /proc and /dev mounted
    (never /sys), DNS and CA bundle from the host, and the wheelhouse bound in.
    Unmounted on exit; the copy is deleted only once nothing is mounted inside it."""
    tarball, _ = cached_root_tarball()
    root = where / "root"
    root.mkdir(parents=True)
    _run(["tar", "-C", str(root), "--numeric-owner", "-I", "zstd -T0", "-xf", str(tarball)], 600)
    wheels = CACHE / "wheels"
    wheels.mkdir(exist_ok=True)
    mounts: list[Path] = []
    try:
        for rel, args in (("proc", ["-t", "proc", "proc"]), ("dev", ["--bind", "/dev"]),
                          (WHEELHOUSE.lstrip("/"), ["--bind", str(wheels)])):  # fmt: skip
            target = root / rel
            target.mkdir(parents=True, exist_ok=True)
            _run(["mount", *args, str(target)], 30)
            mounts.append(target)
        resolv = Path("/etc/resolv.conf")
        if resolv.exists():
            (root / "etc" / "resolv.conf").unlink(missing_ok=True)
            (root / "etc" / "resolv.conf").write_bytes(resolv.read_bytes())
        # The host's CA bundle: where HTTPS goes through an intercepting proxy, its CA is there.
        (root / HOST_CA.lstrip("/")).write_bytes(Path(_host_ca()).read_bytes())
        yield root
    finally:
        for target in reversed(mounts):
            subprocess.run(["umount", str(target)], capture_output=True, check=False)
            if _mounted(target):
                subprocess.run(["umount", "-l", str(target)], capture_output=True, check=False)
        if not any(_mounted(t) for t in mounts):  # never delete through a bind of /dev
            shutil.rmtree(root, ignore_errors=True)


HOST_CA = "/etc/ssl/certs/host-ca-bundle.crt"  # in the root


def _host_ca() -> str:
    return (
        os.environ.get("PIP_CERT")
        or os.environ.get("SSL_CERT_FILE")
        or ("/etc/ssl/certs/ca-certificates.crt")
    )


def chroot_env(**extra: str) -> dict[str, str]:
    """A clean environment for processes in the root: none of the host's pip configuration
    (its indexes hold x86 wheels only), only its CA bundle."""
    env = {
        "PIP_CERT": HOST_CA,
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PIP_DEFAULT_TIMEOUT": "120",
        "PIP_CONFIG_FILE": "/dev/null",
        "OMP_NUM_THREADS": "1",
    }
    env.update(extra)
    return env


def chroot_cmd(root: Path, *argv: str) -> list[str]:
    return ["chroot", str(root), *argv]


def run_in(root: Path, *argv: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run a command inside the root (emulated: qemu-aarch64 through binfmt_misc)."""
    return _run(chroot_cmd(root, *argv), timeout, env=chroot_env())


def hide_compilers(root: Path) -> list[str]:
    """Make sure no C/C++ compiler is reachable in the root: rename any that is there.
    Returns what was hidden (empty for the minbase root, which has none)."""
    hidden = []
    for d in ("usr/local/bin", "usr/bin", "bin"):
        for name in COMPILERS:
            p = root / d / name
            if p.exists() or p.is_symlink():
                p.rename(p.with_name(name + ".hidden-by-test"))
                hidden.append(f"/{d}/{name}")
    return hidden


def compilers_found(root: Path) -> list[str]:
    found = []
    for d in ("usr/local/bin", "usr/bin", "bin", "usr/local/sbin", "usr/sbin", "sbin"):
        found += [f"/{d}/{n}" for n in COMPILERS if (root / d / n).exists()]
    return found


def tree_bytes(path: Path) -> int:
    """Disk use of a tree (allocated blocks, like du)."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
    return total


def install_wheel(root: Path, wheel: Path, venv: str) -> None:
    """Install ``wheel`` and its dependencies into the root's venv ``venv`` (made with
    ``python3 -m venv``) with the venv's own pip. The dependencies (aarch64 wheels from the
    default index) are downloaded once into a wheelhouse keyed by the package's dependency
    list; installs then run offline from it."""
    import tomllib

    deps = tomllib.loads((ROOT_DIR / "pyproject.toml").read_text())["project"]["dependencies"]
    key = hashlib.sha256(f"{cache_key()} {sorted(deps)}".encode()).hexdigest()[:16]
    shutil.copy(wheel, root / "tmp" / wheel.name)
    pip, house = f"{venv}/bin/pip", f"{WHEELHOUSE}/{key}"
    with open(CACHE / "wheels.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = CACHE / "wheels" / key / "complete"
        if not done.exists():
            run_in(root, pip, "download", "-q", "-d", house, f"/tmp/{wheel.name}", timeout=1800)
            for own in (CACHE / "wheels" / key).glob("edgefed-*.whl"):
                own.unlink()  # the package itself always comes from the wheel under test
            done.write_text("\n".join(deps) + "\n")
    run_in(root, pip, "install", "-q", "--no-index", "--find-links", house, f"/tmp/{wheel.name}",
           timeout=1200)  # fmt: skip
