"""Teacher -> distilled student -> pruned student, fp32 and int8 of each, measured in one table.

Every candidate is exported to ONNX and measured as it would ship (onnxruntime latency at
batch 1 and 64 with fixed threads, accuracy of the ONNX model on held-out data). A candidate
whose accuracy drop vs the teacher exceeds the budget is refused; the chosen candidate is the
best remaining one for the objective: "size" (fewest bytes) or "latency" (lowest batch-64
latency; "latency1": batch 1). int8 is a candidate, never assumed better: on narrow models
its quantize/dequantize overhead can make it slower than fp32.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from edgefed.export.distill import distill
from edgefed.export.measure import (
    INPUT_NAME,
    OPSET,
    OUTPUT_NAME,
    accuracy,
    export_onnx,
    latency_ms,
    parity,
    session,
)
from edgefed.export.prune import prune_structured, width_scaled
from edgefed.export.quantize_onnx import quantize_dynamic_int8, quantize_static_qdq
from edgefed.zoo.data import TaskData
from edgefed.zoo.models import param_count as count_params

Objective = Literal["size", "latency", "latency1"]
Log = Callable[[str], None]
PARITY_TOL = 1e-3  # max |ORT - torch| logit difference accepted for float stages

# The dynamo exporter logs one warning per missing torchvision op: noise for our models.
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)


@dataclass
class ExportConfig:
    objective: Objective = "size"
    accuracy_budget_pp: float = 1.0  # max drop vs the teacher, percentage points
    temperature: float = 4.0
    alpha: float = 0.7
    width: float = 0.5  # student = teacher with widths x this (when no student is given)
    prune_ratio: float = 0.5  # 0 disables the pruning stage
    distill_epochs: int = 3
    finetune_epochs: int = 3
    lr: float = 3e-3
    batch_size: int = 128
    quantize: Literal["static", "dynamic", "both", "none"] = "static"
    calibration_samples: int = 512
    threads: int = 2
    latency_runs: int = 30
    seed: int = 0

    def __post_init__(self) -> None:
        if self.objective not in ("size", "latency", "latency1"):
            raise ValueError(f"objective must be size, latency or latency1, not {self.objective}")
        if self.accuracy_budget_pp < 0:
            raise ValueError("accuracy budget must be >= 0 percentage points")
        if not 0.0 <= self.prune_ratio < 1.0:
            raise ValueError("prune_ratio must be in [0, 1)")
        if self.quantize not in ("static", "dynamic", "both", "none"):
            raise ValueError(f"unknown quantize mode {self.quantize!r}")


@dataclass
class Stage:
    name: str
    params: int
    bytes: int
    ms_b1: float
    ms_b64: float
    accuracy: float
    drop_pp: float = 0.0
    parity: float | None = None  # max |ORT - torch|, float stages only
    status: str = "ok"  # "ok" or "refused: <reason>"
    source: str = ""  # key of the float torch model in PipelineResult.models
    onnx: bytes = field(default=b"", repr=False)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def row(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("onnx")
        return d


class AccuracyBudgetError(Exception):
    """A requested stage broke the accuracy budget; ``table`` shows every stage."""

    def __init__(self, reason: str, table: str) -> None:
        super().__init__(f"{reason}\n{table}")
        self.reason, self.table = reason, table


@dataclass
class PipelineResult:
    stages: list[Stage]
    chosen: Stage
    config: ExportConfig
    models: dict[str, nn.Module] = field(default_factory=dict, repr=False)

    def table(self) -> str:
        return format_table(self.stages, self.chosen.name)

    def metrics(self) -> dict[str, Any]:
        """JSON-able summary (goes into the bundle manifest and benchmark JSON)."""
        return {
            "chosen": self.chosen.name,
            "objective": self.config.objective,
            "budget_pp": self.config.accuracy_budget_pp,
            "threads": self.config.threads,
            "stages": [s.row() for s in self.stages],
        }

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"no stage {name!r}; stages: {[s.name for s in self.stages]}")

    def require(self, name: str) -> Stage:
        """Return stage ``name`` or raise AccuracyBudgetError (with the table) if refused."""
        s = self.stage(name)
        if not s.ok:
            raise AccuracyBudgetError(f"stage {name!r} {s.status}", self.table())
        return s


def format_table(stages: list[Stage], chosen: str | None = None) -> str:
    head = "| stage | params | ONNX bytes | ms b1 | ms b64 | acc % | drop pp | status |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---|"]
    for s in stages:
        mark = " **(chosen)**" if s.name == chosen else ""
        lines.append(
            f"| {s.name}{mark} | {s.params:,} | {s.bytes:,} | {s.ms_b1:.3f} | {s.ms_b64:.2f} "
            f"| {100 * s.accuracy:.2f} | {s.drop_pp:+.2f} | {s.status} |"
        )
    return "\n".join(lines)


class _Runner:
    """Measures candidates and applies the budget; one per pipeline run."""

    def __init__(self, data: TaskData, cfg: ExportConfig, log: Log) -> None:
        self.data, self.cfg, self.log = data, cfg, log
        self.stages: list[Stage] = []
        self.teacher_acc: float | None = None
        rng = np.random.default_rng(cfg.seed)
        n = min(cfg.calibration_samples, len(data.x_train))
        self.calib = data.x_train[rng.choice(len(data.x_train), n, replace=False)]
        self.example = torch.from_numpy(data.x_train[:2].copy())

    def measure(
        self, name: str, source: str, onnx_bytes: bytes, params: int, module: nn.Module | None
    ) -> Stage:
        cfg, d = self.cfg, self.data
        sess = session(onnx_bytes, cfg.threads)
        acc = accuracy(sess, d.x_test, d.y_test)
        sample = d.x_test[0]
        stage = Stage(
            name=name,
            params=params,
            bytes=len(onnx_bytes),
            ms_b1=latency_ms(sess, sample, 1, runs=cfg.latency_runs * 4),
            ms_b64=latency_ms(sess, sample, 64, runs=cfg.latency_runs),
            accuracy=acc,
            source=source,
            onnx=onnx_bytes,
        )
        if module is not None:
            stage.parity = parity(module, onnx_bytes, d.x_test[:64])
            if stage.parity > PARITY_TOL:
                raise RuntimeError(
                    f"{name}: onnxruntime output differs from torch by {stage.parity:.2e} "
                    f"(> {PARITY_TOL}); refusing to ship a wrong export"
                )
        if self.teacher_acc is None:
            self.teacher_acc = acc
        stage.drop_pp = 100.0 * (self.teacher_acc - acc)
        if stage.drop_pp > cfg.accuracy_budget_pp:
            stage.status = (
                f"refused: drop {stage.drop_pp:.2f} pp > budget {cfg.accuracy_budget_pp:.2f} pp"
            )
        self.stages.append(stage)
        self.log(f"measured {name}: {len(onnx_bytes):,} B, acc {100 * acc:.2f}%, {stage.status}")
        return stage

    def float_and_int8(self, name: str, model: nn.Module) -> Stage:
        fp = export_onnx(model, self.example)
        stage = self.measure(f"{name} fp32", name, fp, count_params(model), model)
        if self.cfg.quantize in ("static", "both"):
            q = quantize_static_qdq(fp, self.calib, input_name=INPUT_NAME)
            self.measure(f"{name} int8 static", name, q, count_params(model), None)
        if self.cfg.quantize in ("dynamic", "both"):
            self.measure(
                f"{name} int8 dynamic", quantize_dynamic_int8(fp), count_params(model), None
            )
        return stage


class Progress:
    """Plain progress lines on the log (stderr in the CLI): ``[export 2/5 0:12] what``.
    No dependency and no terminal tricks, so it reads the same in a CI log."""

    def __init__(self, total: int, log: Log) -> None:
        self.total, self.log, self.i, self.t0 = total, log, 0, time.monotonic()

    def _stamp(self) -> str:
        s = int(time.monotonic() - self.t0)
        return f"{s // 60}:{s % 60:02d}"

    def step(self, what: str) -> None:
        self.i += 1
        bar = "#" * self.i + "." * max(0, self.total - self.i)
        self.log(f"[export {bar} {self.i}/{self.total} {self._stamp()}] {what}")

    def done(self) -> None:
        self.log(f"[export {'#' * self.total} done {self._stamp()}]")


def pick_stage(stages: list[Stage], objective: Objective) -> Stage:
    key: dict[str, Callable[[Stage], tuple[float, float]]] = {
        "size": lambda s: (s.bytes, s.ms_b64),
        "latency": lambda s: (s.ms_b64, s.bytes),
        "latency1": lambda s: (s.ms_b1, s.bytes),
    }
    return min((s for s in stages if s.ok), key=key[objective])


def run_pipeline(
    teacher: nn.Module,
    data: TaskData,
    cfg: ExportConfig | None = None,
    *,
    student: nn.Module | None = None,
    log: Log = lambda _: None,
) -> PipelineResult:
    """Distill, prune and quantize ``teacher``; measure every candidate; pick by objective.

    ``student``: an architecture to distill into (initialised by the caller); default is the
    teacher with widths scaled by ``cfg.width``. Labels in ``data.y_train`` are optional.
    """
    cfg = cfg or ExportConfig()
    torch.manual_seed(cfg.seed)
    teacher = teacher.eval()
    steps = 3 + 2 * (cfg.prune_ratio > 0)
    progress = Progress(steps, log)
    run = _Runner(data, cfg, log)
    models: dict[str, nn.Module] = {"teacher": teacher}
    progress.step("measuring the teacher (fp32 ONNX + int8)")
    run.float_and_int8("teacher", teacher)

    kd = dict(
        temperature=cfg.temperature,
        alpha=cfg.alpha,
        lr=cfg.lr,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        log=log,
    )
    if student is None:
        student = width_scaled(teacher, run.example, cfg.width)
        s_name = f"distilled w{cfg.width:g}"
    else:
        student = copy.deepcopy(student)
        s_name = "distilled student"
    progress.step(f"distilling into {s_name} ({cfg.distill_epochs} epochs)")
    distill(student, teacher, data.x_train, data.y_train, epochs=cfg.distill_epochs, **kd)
    models[s_name] = student
    progress.step(f"measuring {s_name}")
    s_stage = run.float_and_int8(s_name, student)

    if cfg.prune_ratio > 0:
        progress.step(f"pruning {cfg.prune_ratio:g} of {s_name}'s channels + KD fine-tune")
        if s_stage.ok:
            pruned = prune_structured(student, run.example, cfg.prune_ratio)
            distill(pruned, teacher, data.x_train, data.y_train, epochs=cfg.finetune_epochs, **kd)
            p_name = f"{s_name} pruned {cfg.prune_ratio:g}"
            models[p_name] = pruned
            progress.step(f"measuring {p_name}")
            run.float_and_int8(p_name, pruned)
        else:
            log(f"not pruning {s_name!r}: it is already outside the accuracy budget")
    progress.done()
    chosen = pick_stage(run.stages, cfg.objective)
    log(f"chosen for objective {cfg.objective!r}: {chosen.name}")
    return PipelineResult(run.stages, chosen, cfg, models)


def manifest_for(
    result: PipelineResult, data: TaskData, model_version: str, stage: Stage | None = None
) -> Any:
    """The bundle manifest (edgefed.bundle.Manifest) for the chosen (or given) stage."""
    from edgefed.bundle import Manifest, TensorSpec

    stage = stage or result.chosen
    sample_shape = list(data.x_test.shape[1:])
    metrics = result.metrics()
    metrics["chosen"] = stage.name
    return Manifest(
        model_version=model_version,
        inputs=[TensorSpec(INPUT_NAME, ["batch", *sample_shape], "float32")],
        outputs=[TensorSpec(OUTPUT_NAME, ["batch", len(data.labels)], "float32")],
        opset=OPSET,
        labels=list(data.labels),
        preprocessing=dict(data.preprocessing),
        metrics=json.loads(json.dumps(metrics)),
    )


def make_bundle(
    result: PipelineResult,
    data: TaskData,
    model_version: str,
    *,
    signing_key: Any = None,
    stage: Stage | None = None,
    train_step: bool = False,
) -> bytes:
    """Bundle bytes for the chosen (or given) stage; signed when ``signing_key`` is given.

    ``train_step=True`` adds the on-device training-step graph of the chosen stage's float
    model (edgefed.train_export, verification gate on). Only float stages qualify: an int8
    QDQ graph is not trainable.
    """
    from edgefed.bundle import build_bundle

    stage = stage or result.chosen
    manifest = manifest_for(result, data, model_version, stage)
    step_onnx = step_manifest = None
    if train_step:
        if "int8" in stage.name:
            raise ValueError(f"{stage.name} is int8: ship a float stage to fine-tune on device")
        module = result.models.get(stage.source)
        if module is None or data.y_train is None:
            raise ValueError(f"no float model (or no labels) for a training step of {stage.name}")
        from edgefed.train_export import export_training_step

        n = min(8, len(data.x_train))
        step = export_training_step(
            copy.deepcopy(module),
            (torch.from_numpy(data.x_train[:n]), torch.from_numpy(data.y_train[:n])),
            loss="cross_entropy",
        )
        step_onnx, step_manifest = step.onnx, step.manifest
    return build_bundle(
        stage.onnx,
        manifest,
        train_step_onnx=step_onnx,
        train_step_manifest=step_manifest,
        signing_key=signing_key,
    )
