"""The ``edgefed`` command line: one sub-command per job, each in its own module.

Only the chosen sub-command's module is imported, so ``edgefed --help`` and the
torch-free commands never pay for importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from edgefed import __version__

# name -> (help, module). Each module defines `add_arguments(parser)` and `run(args) -> int`.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("run the federated demo (embedded broker, coordinator, devices)", "edgefed.apps.demo"),
    "simulate": ("run a federated simulation with options", "edgefed.apps.simulate"),
    "coordinator": ("run the coordinator service", "edgefed.coordinator.cli"),
    "aggregator": ("run a sharded aggregator worker", "edgefed.sharding.cli"),
    "export": ("distill / prune / quantize a model into an ONNX bundle", "edgefed.export.cli"),
    "bundle": ("inspect, verify, sign or publish (roll out) a model bundle", "edgefed.bundle.cli"),
    "keygen": ("create an Ed25519 signing key pair", "edgefed.bundle.keygen_cli"),
    "broker-config": ("write a secured mosquitto config for a fleet", "edgefed.fleetops.cli"),
    "quantize-bench": ("quick int8 quantize throughput check", "edgefed.apps.quantize_bench"),
}


def build_parser(chosen: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgefed", description="edgefed: federated learning for edge devices"
    )
    parser.add_argument("--version", action="version", version=f"edgefed {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, module) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if name == chosen:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(chosen if chosen in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
