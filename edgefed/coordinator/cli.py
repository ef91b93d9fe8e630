"""``edgefed coordinator --config coordinator.toml``: run the coordinator service."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="coordinator TOML (see examples/)")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")


def build_engine(cfg: Any, base_dir: str | Path | None = None) -> Any:
    """Model (exported step graphs), strategy and held-out evaluation from the config.
    ``base_dir``: the config's directory (a ``[model] factory`` file is relative to it)."""
    from edgefed.coordinator.model import federated_model_from_config
    from edgefed.coordinator.rounds import RoundEngine
    from edgefed.simulation import make_evaluator
    from edgefed.zoo.data import load_digits_arrays, train_test_split

    strategy = cfg.make_strategy()
    m = cfg.model
    image = m.get("builtin") == "digits_cnn"
    ev = cfg.evaluation
    x_test = y_test = None
    if ev.get("dataset", "digits") == "digits":
        x, y = load_digits_arrays(image)
        _, _, x_test, y_test = train_test_split(x, y, seed=int(ev.get("seed", 0)))
    elif ev.get("dataset"):
        with np.load(ev["dataset"], allow_pickle=False) as z:
            x_test, y_test = z["x"], z["y"]
    fm = federated_model_from_config(
        m, base_dir, seed=cfg.round.seed, fedprox=strategy.name == "fedprox"
    )
    evaluate = None
    if x_test is not None:
        fm.evaluation = (x_test, y_test)
        g = fm.graphs["full"]
        evaluate = make_evaluator(g.inference_onnx, g.manifest, x_test, y_test)
    return RoundEngine(fm, strategy, cfg.round, evaluate)


def run(args: argparse.Namespace) -> int:
    from edgefed.coordinator.config import CoordinatorConfig
    from edgefed.coordinator.metrics import MetricsWriter
    from edgefed.coordinator.service import CoordinatorService

    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        cfg = CoordinatorConfig.load(args.config)
    except (OSError, ValueError) as e:  # ConfigError: one line naming file and key
        print(f"edgefed coordinator: {e}", file=sys.stderr)
        return 2
    signer = None
    if cfg.signing_key:
        from edgefed.bundle.format import BundleError
        from edgefed.bundle.signing import load_signing_key
        from edgefed.security.downlink import DownlinkSigner

        try:
            signer = DownlinkSigner(load_signing_key(cfg.signing_key))
        except (ValueError, BundleError) as e:
            print(f"edgefed coordinator: [security] signing_key: {e}", file=sys.stderr)
            return 2
    try:
        engine = build_engine(cfg, Path(args.config).resolve().parent)
    except ValueError as e:  # UserModelError / ModelConfigError: one line naming the key
        print(f"edgefed coordinator: {args.config}: {e}", file=sys.stderr)
        return 2
    svc = CoordinatorService(
        engine,
        cfg.transport,
        cfg.rounds,
        checkpoint=cfg.checkpoint,
        metrics=MetricsWriter(cfg.metrics, sys.stdout),
        wait_timeout=cfg.wait_timeout,
        sharding=cfg.sharding,
        sharding_transport=cfg.sharding_transport,
        signer=signer,
    )
    try:
        svc.run()
    except KeyboardInterrupt:
        return 130
    except TimeoutError as e:
        print(f"edgefed coordinator: {e}", file=sys.stderr)
        return 1
    from edgefed.coordinator.artifact import DIRNAME, artifact_dir_for, write_engine_artifact

    where = write_engine_artifact(
        artifact_dir_for(cfg.checkpoint)
        if cfg.checkpoint
        else Path(args.config).resolve().parent / DIRNAME,
        engine,
    )
    print(f"federated model (round {engine.round}): {where.parent}")
    return 0
