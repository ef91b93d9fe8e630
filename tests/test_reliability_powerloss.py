"""Reliability: device-side power loss while the agent writes its state.

A real subprocess (this file run as a script) repeatedly commits "version v" of an agent's
state the way ``DeviceWorker.handle_task`` does - outbox, error-feedback residual, deployed
model (model.npz + model.json), then state.json last - with the real ``AgentState`` and
``ErrorFeedback`` code, fsync on. The test SIGKILLs it at random instants (model.npz is
4 MB, so many kills land inside a write), 25 times, restarting it in between; each restart
continues from the version it finds committed.

After every kill, every file must load and equal exactly one whole version, and the
versions must respect the commit order: if state.json says v, the outbox, residual and
model are each v or v+1 (never older, never torn). SIGKILL cannot drop the page cache, so
this proves atomicity against process death; against a real power cut it relies on the
fsyncs in ``atomic_write`` / ``ErrorFeedback.save`` (reviewed, not testable here).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from device_agent.state import AgentState
from edgefed.codec import CompressionSpec, ErrorFeedback, ModelSchema, UpdateMeta, encode_update

pytestmark = pytest.mark.system  # SIGKILLed writer processes

DEV = "dev-pl"
SCHEMA = {"w": (1024, 1024), "b": (64,)}


def model_v(v: int) -> dict[str, np.ndarray]:
    return {"w": np.full((1024, 1024), v, np.float32), "b": np.arange(64, dtype=np.float32) + v}


def residual_v(v: int) -> ErrorFeedback:
    """A residual that depends on v: top-1% of a v-seeded delta leaves the rest behind."""
    ef = ErrorFeedback(ModelSchema({"r": (4096,)}))
    delta = {"r": np.random.default_rng(v).standard_normal(4096).astype(np.float32)}
    encode_update(delta, UpdateMeta(v, DEV, 1, "x"), CompressionSpec.parse("topk:0.01"), ef)
    return ef


def outbox_v(v: int) -> bytes:
    return f"update-{v}|".encode() * 20000


def writer(state_dir: str) -> None:
    st = AgentState(state_dir, DEV, durable=True)
    v = st.last_round
    print("ready", flush=True)  # the test's random delay starts now, not at process start
    while True:
        v += 1
        st.save_outbox(outbox_v(v))
        residual_v(v).save(st.residual_path)
        st.save_model(model_v(v), "g0", f"v{v}")
        st.last_round, st.model_version, st.last_update_id = v, f"v{v}", f"u{v}"
        st.save()


def check(state_dir: Path) -> int:
    st = AgentState(state_dir, DEV)  # raises on a torn state.json
    v = st.last_round
    ok = {v, v + 1} if v else {1}
    out = st.load_outbox()
    assert out is not None or v == 0
    if out is not None:
        k = int(out[len(b"update-") : out.index(b"|")])
        assert out == outbox_v(k) and k in ok, (k, v)
    if st.residual_path.exists():
        ef = ErrorFeedback.load(st.residual_path, ModelSchema({"r": (4096,)}))
        got = ef.residuals()["r"]
        match = [k for k in (v, v + 1) if np.array_equal(got, residual_v(k).residuals()["r"])]
        assert match, f"residual is neither version {v} nor {v + 1}"
    if (state_dir / "model.json").exists() and (state_dir / "model.npz").exists():
        params, _, version = st.load_model()
        k = int(params["w"].flat[0])
        for name, a in model_v(k).items():
            np.testing.assert_array_equal(params[name], a)
        assert k in ok, (k, v)
        # model.json is written after model.npz: its version is k or k-1
        assert version in (f"v{k}", f"v{k - 1}"), (version, k)
    return v


def test_sigkill_during_state_writes_leaves_old_or_new_never_torn(tmp_path: Path) -> None:
    rng = random.Random(7)
    env = dict(os.environ)
    seen: list[int] = []
    for _ in range(25):
        p = subprocess.Popen(
            [sys.executable, __file__, str(tmp_path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert p.stdout is not None and p.stdout.readline() == b"ready\n"
        time.sleep(rng.uniform(0.05, 0.8))  # a random instant to cut power: not a wait
        p.send_signal(signal.SIGKILL)
        _, err = p.communicate(timeout=30)
        assert p.returncode == -signal.SIGKILL, err.decode()[-2000:]
        seen.append(check(tmp_path))
    assert seen == sorted(seen) and seen[-1] >= 10, seen  # progress across kills
    assert len(set(seen)) >= 10, seen  # kills landed at many different points
    # temporary files of interrupted writes are not left to pile up across restarts
    names = [f.name for f in tmp_path.iterdir()]
    leftovers = [n for n in names if n.endswith(".tmp") or n.startswith(".residual.ef.")]
    assert leftovers == [], leftovers


if __name__ == "__main__":
    writer(sys.argv[1])
