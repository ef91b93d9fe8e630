"""``edgefed simulate`` exposes ``edgefed.simulate``'s asynchronous, fleet-clock and
adaptive-uplink options (issue 15): a real run of the command (a subprocess, the built-in
digits task: the command has no user-model option) in async mode on a slow, intermittent
fleet with one 10 kB/s link; and every bad value is one line on stderr naming its option."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgefed.apps.cli import main


@pytest.mark.system  # a federated simulation end to end
def test_simulate_command_async_fleet_clock_and_adaptive_uplink(tmp_path: Path) -> None:
    out = tmp_path / "sim"
    args = [
        "simulate", "--devices", "4", "--rounds", "3", "--mode", "async", "--buffer-size", "2",
        "--max-staleness", "3", "--staleness-weight", "poly:0.5", "--speeds", "spread:8",
        "--offline-fraction", "0.2", "--links", "1e4,1e6,1e6,1e6", "--upload-budget-s", "0.5",
        "--ladder", "int8,topk:0.1+int8", "--out", str(out),
    ]  # fmt: skip
    p = subprocess.run([sys.executable, "-m", "edgefed", *args], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [json.loads(x) for x in (out / "metrics-int8.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [1, 2, 3]  # --rounds counts model versions
    assert all(r["mode"] == "async" and r["participants"] == 2 for r in lines), lines
    assert all(r["staleness_max"] is not None and r["staleness_max"] <= 3 for r in lines)
    clock = [r["clock_s"] for r in lines]
    assert clock == sorted(clock) and clock[0] > 0  # the simulated clock ran
    specs = {d: u["spec"] for r in lines for d, u in r["uplink"].items()}
    assert specs["dev-000"] == "topk:0.1+int8" and specs["dev-001"] == "int8", specs
    assert "clock s" in p.stdout and (out / "accuracy.png").exists()


@pytest.mark.parametrize(
    ("option", "value", "want"),
    [
        ("--mode", "fast", "argument --mode: invalid choice: 'fast'"),
        ("--buffer-size", "0", "argument --buffer-size: expected an integer >= 1, found '0'"),
        ("--max-staleness", "x", "argument --max-staleness: expected an integer >= 0, found 'x'"),
        ("--speeds", "1,x", "argument --speeds: expected comma-separated positive numbers"),
        ("--speeds", "spread:0.5", "argument --speeds: expected a number >= 1, found '0.5'"),
        ("--offline-fraction", "1", "argument --offline-fraction: expected a number >= 0 and < 1"),
        ("--links", "0", "argument --links: expected comma-separated positive numbers"),
        ("--upload-budget-s", "-1", "argument --upload-budget-s: expected a number >= 0"),
        ("--ladder", "int8,zip", "argument --ladder: bad spec 'zip'"),
        ("--staleness-weight", "poly:x", 'argument --staleness-weight: expected "poly:A"'),
        ("--links", "1,2", "--links: expected 1 or 10 values (--devices), found 2"),
    ],
)
def test_simulate_command_bad_values_one_line(
    option: str, value: str, want: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with pytest.raises(SystemExit) as e:
        code = main(["simulate", option, value, "--out", str(tmp_path)])
        raise SystemExit(code)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"edgefed simulate: {want}"), err
