"""ms per training step: onnxruntime (exported step graph) vs torch eager, batch 32.

Also: RSS of a device process training the 28x28 CNN (subprocess importing only
device_agent + onnxruntime) and the agent install footprint vs torch's.
Run: PYTHONPATH=. python benchmarks/train_step.py [--quick]
Writes benchmarks/out/train_step.json. Targets (issue 4): ORT >= 1.3x torch for the MLPs,
>= 1.0x for the 28x28 CNN; RSS < 150 MB.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from device_agent.trainer import StepTrainer
from edgefed.train_export import SGD, export_training_step
from edgefed.zoo.models import cnn_28, digits_cnn, digits_mlp, mlp_784, param_count

OUT = Path(__file__).parent / "out"
BATCH = 32
# Plain SGD is the coordinator's default local optimizer; momentum 0.9 is the common variant.
OPTIMIZERS = {"sgd": 0.0, "sgd-m0.9": 0.9}
MODELS = {
    "digits MLP 64-32-10": (digits_mlp, (64,), 1.3),
    "digits CNN": (digits_cnn, (1, 8, 8), 1.3),
    "MLP 784-1024-512-10": (mlp_784, (1, 28, 28), 1.3),
    "CNN 28x28": (cnn_28, (1, 28, 28), 1.0),
}


def _interleaved_rounds(fns, steps: int, repeats: int) -> list[dict[str, list[float]]]:
    """Per function, ms/step of every round: wall clock and the calling thread's CPU time.

    Rounds alternate between the functions (fair on a noisy box). The CPU time counts only
    what ran on this thread, which is all of the work at 1 thread (torch and onnxruntime both
    run a single-threaded op on the caller): time spent descheduled while other processes
    ran is not in it, so it is the steadier figure on a shared machine. With more threads
    the workers' time is missing from it; read the wall clock then.
    """
    for fn in fns:
        for _ in range(max(3, steps // 5)):
            fn()
    runs: list[dict[str, list[float]]] = [{"wall": [], "cpu": []} for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            time.sleep(0.05)  # let the other runtime's worker threads stop spinning first
            t, c = time.perf_counter(), time.thread_time()
            for _ in range(steps):
                fn()
            runs[i]["wall"].append((time.perf_counter() - t) / steps * 1e3)
            runs[i]["cpu"].append((time.thread_time() - c) / steps * 1e3)
    return runs


def torch_sgd_step(model, x, y, loss_fn=None, momentum: float = 0.9):
    """A closure running one torch eager SGD step on a copy of ``model`` (lr 0.01, cross
    entropy unless ``loss_fn``): the baseline every step is timed against."""
    ref = copy.deepcopy(model).train()
    opt = torch.optim.SGD(ref.parameters(), lr=0.01, momentum=momentum)
    loss = loss_fn or torch.nn.functional.cross_entropy

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss(ref(x), y).backward()
        opt.step()

    return step


def _interleaved_ms(fns, steps: int, repeats: int) -> list[float]:
    """Median wall-clock ms/step per function over interleaved rounds."""
    return [float(np.median(r["wall"])) for r in _interleaved_rounds(fns, steps, repeats)]


_GRAPHS: dict[tuple[str, str], tuple[torch.nn.Module, object]] = {}


def _export(name: str, opt: str = "sgd"):
    make, shape, _ = MODELS[name]
    torch.manual_seed(0)
    model = make()
    x = torch.randn(8, *shape)
    y = torch.randint(0, 10, (8,))
    g = export_training_step(model, (x, y), optimizer=SGD(momentum=OPTIMIZERS[opt]))
    _GRAPHS[(name, opt)] = (model, g)
    return _GRAPHS[(name, opt)]


def bench_model(
    name: str, opt_name: str, threads_list: list[int], steps: int, repeats: int
) -> list[dict]:
    _, shape, target = MODELS[name]
    t0 = time.perf_counter()
    model, g = _export(name, opt_name)
    export_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, *shape, generator=gen)
    y = torch.randint(0, 10, (BATCH,), generator=gen)
    xn, yn = x.numpy(), y.numpy()
    rows = []
    for threads in threads_list:
        torch.set_num_threads(threads)
        torch_step = torch_sgd_step(model, x, y, momentum=OPTIMIZERS[opt_name])
        tr = StepTrainer(g.onnx, g.manifest, threads=threads)
        tr.set_params({k: v.detach().numpy() for k, v in model.state_dict().items()})
        tr._scalars["lr"][()] = 0.01

        def ort_step(tr=tr) -> None:
            tr._step(xn, yn)  # the exact per-step path of train_epochs (bound buffers)

        t_ms, o_ms = _interleaved_ms([torch_step, ort_step], steps, repeats)
        rows.append(
            {
                "model": name,
                "optimizer": opt_name,
                "params": param_count(model),
                "threads": threads,
                "ort_ms": o_ms,
                "torch_ms": t_ms,
                "speedup": t_ms / o_ms,
                "target": target,
                "export_s": export_s,
                "graph_bytes": len(g.onnx),
            }
        )
        print(
            f"{name:22s} {opt_name:8s} thr={threads} ort {o_ms:8.3f} ms  torch {t_ms:8.3f} ms  "
            f"x{t_ms / o_ms:5.2f} (target >= {target})",
            flush=True,
        )
    return rows


RSS_CHILD = r"""
import sys, json
sys.modules["torch"] = None  # any torch import fails loudly
import numpy as np
from device_agent.trainer import StepTrainer
d = sys.argv[1]
tr = StepTrainer(d + "/step.onnx", d + "/manifest.json", threads=1, low_memory=sys.argv[2] == "1")
p = dict(np.load(d + "/params.npz"))
tr.set_params(p)
rng = np.random.default_rng(0)
x = rng.standard_normal((512, 1, 28, 28)).astype(np.float32)
y = rng.integers(0, 10, 512)
tr.train_epochs(x, y, epochs=1, batch_size=32, lr=0.01)
# VmHWM (peak RSS of THIS image; ru_maxrss would include the forking parent's RSS)
st = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
kb = lambda k: int(st[k].split()[0])
print(json.dumps({"max_rss_mb": kb("VmHWM") / 1024, "rss_mb": kb("VmRSS") / 1024}))
"""


def rss_cnn28() -> dict:
    """Peak RSS of a fresh process (device_agent + onnxruntime only) training the 28x28 CNN."""
    model, g = _GRAPHS.get(("CNN 28x28", "sgd")) or _export("CNN 28x28")
    res: dict = {}
    with tempfile.TemporaryDirectory() as d:
        g.save(d)
        keep = g.manifest["params"]
        np.savez(
            Path(d) / "params.npz",
            **{k: v.detach().numpy() for k, v in model.state_dict().items() if k in keep},
        )
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
        for low in (0, 1):
            out = subprocess.run(
                [sys.executable, "-c", RSS_CHILD, d, str(low)],
                capture_output=True,
                text=True,
                env=env,
                check=True,
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            res["low_memory" if low else "default"] = r
            print(
                f"device process training CNN 28x28 (low_memory={bool(low)}): peak RSS "
                f"{r['max_rss_mb']:.1f} MB (target < 150)",
                flush=True,
            )
    return res


def _dir_size(paths: list[Path]) -> int:
    total = 0
    for p in paths:
        if p.is_file():
            total += p.stat().st_size
        for root, _, files in os.walk(p):
            total += sum(
                (Path(root) / f).stat().st_size for f in files if not (Path(root) / f).is_symlink()
            )
    return total


def footprint() -> dict:
    import importlib.util

    def pkg_paths(dist: str, mods: list[str]) -> list[Path]:
        paths: list[Path] = []
        for m in mods:
            spec = importlib.util.find_spec(m)
            if spec and spec.submodule_search_locations:
                paths += [Path(p) for p in spec.submodule_search_locations]
            elif spec and spec.origin:
                paths.append(Path(spec.origin))
        from importlib.metadata import distribution

        try:
            d = distribution(dist)
            paths += [Path(d._path)]  # type: ignore[attr-defined]
        except Exception:
            pass
        return paths

    agent = {
        "numpy": pkg_paths("numpy", ["numpy", "numpy.libs"]),
        "onnxruntime": pkg_paths("onnxruntime", ["onnxruntime"]),
        "paho-mqtt": pkg_paths("paho-mqtt", ["paho"]),
        "pynacl": pkg_paths("pynacl", ["nacl"]),
    }
    sizes = {k: _dir_size(v) / 2**20 for k, v in agent.items()}
    site = Path(np.__file__).parents[1]
    extra = [site / "numpy.libs"] if (site / "numpy.libs").exists() else []
    sizes["numpy"] += _dir_size(extra) / 2**20
    torch_mb = _dir_size(pkg_paths("torch", ["torch", "torchgen", "functorch"])) / 2**20
    res = {"agent_packages_mb": sizes, "agent_total_mb": sum(sizes.values()), "torch_mb": torch_mb}
    print(
        f"agent install (numpy+onnxruntime+paho-mqtt+pynacl): {res['agent_total_mb']:.0f} MB "
        f"vs torch alone {torch_mb:.0f} MB"
    )
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer steps (noisy)")
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--optimizers", nargs="*", default=list(OPTIMIZERS))
    ap.add_argument("--no-rss", action="store_true", help="skip the RSS and footprint runs")
    args = ap.parse_args()
    steps, repeats = (20, 3) if args.quick else (50, 5)
    rows = []
    for name in args.models:
        for opt_name in args.optimizers:
            rows += bench_model(name, opt_name, [1, 2], steps, repeats)
    if args.no_rss:
        return
    rss = rss_cnn28()
    fp = footprint()
    print(
        "\n| model | optimizer | params | threads | onnxruntime ms | torch eager ms | speedup "
        "| target |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['optimizer']} | {r['params']:,} | {r['threads']} | "
            f"{r['ort_ms']:.3f} | "
            f"{r['torch_ms']:.3f} | {r['speedup']:.2f}x | >= {r['target']}x |"
        )
    OUT.mkdir(exist_ok=True)
    ort_v = __import__("onnxruntime").__version__
    machine = f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}, ORT {ort_v}"
    (OUT / "train_step.json").write_text(
        json.dumps(
            {"machine": machine, "batch": BATCH, "steps": rows, "rss": rss, "footprint": fp},
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
