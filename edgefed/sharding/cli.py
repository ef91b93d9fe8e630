"""``edgefed aggregator --config worker.toml``: run one aggregator worker until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="worker TOML (see edgefed.sharding.config)")
    parser.add_argument("--id", dest="worker_id", help="override [worker] id")
    parser.add_argument("--broker", help="override [transport] url, e.g. mqtt://host:1883")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from edgefed.sharding.config import WorkerConfig
    from edgefed.sharding.worker import AggregatorWorker

    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        cfg = WorkerConfig.load(args.config)
        if args.worker_id:
            cfg = cfg.with_id(args.worker_id)
        if args.broker:
            cfg = replace(cfg, transport=replace(cfg.transport, url=args.broker))
    except (OSError, ValueError) as e:  # ConfigError: one line naming file and key
        print(f"edgefed aggregator: {e}", file=sys.stderr)
        return 2
    worker = AggregatorWorker(cfg)
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()
        worker._stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        worker.start(timeout=60)
    except (TimeoutError, OSError) as e:
        print(f"edgefed aggregator: broker {cfg.transport.url}: {e}", file=sys.stderr)
        worker.stop()
        return 1
    print(f"aggregator {cfg.worker_id} ready (instance {worker.instance})", flush=True)
    try:
        worker.run()
    finally:
        worker.stop()
    return 0
