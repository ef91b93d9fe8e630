"""``edgefed-agent --config agent.toml`` runs the device agent;
``edgefed-agent predict --config agent.toml --input x.npy`` runs the deployed model."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _run(args: argparse.Namespace) -> int:
    from device_agent.agent import AgentConfig, AgentService, DeviceWorker
    from device_agent.trainer import TrainerError

    try:
        cfg = AgentConfig.load(args.config)
        check_npz(cfg.data, ("x", "y"), f"{args.config}: [agent] data")
        with np.load(cfg.data, allow_pickle=False) as z:
            x, y = z["x"], z["y"]
            # optional held-out split: what canary roll-outs are evaluated on
            holdout = (z["x_val"], z["y_val"]) if {"x_val", "y_val"} <= set(z.files) else None
        worker = DeviceWorker(
            cfg.device_id, x, y, cfg.state_dir, threads=cfg.threads, data_file=cfg.data,
            step_s=cfg.emulate_step_s,
        )  # fmt: skip
    except (OSError, ValueError, KeyError, TrainerError) as e:
        print(f"edgefed-agent: {e}", file=sys.stderr)
        return 2
    mismatch = worker.contract_mismatch()  # the contract of the last model received, if any
    if mismatch is not None:  # keep serving: each task is refused with this reason
        print(f"edgefed-agent: {mismatch}", file=sys.stderr)
    verifier = None
    if cfg.coordinator_key:
        from edgefed.bundle.format import BundleError
        from edgefed.bundle.signing import load_verify_key
        from edgefed.security.downlink import DownlinkVerifier

        try:
            verifier = DownlinkVerifier(load_verify_key(cfg.coordinator_key))
        except (ValueError, BundleError) as e:
            print(f"edgefed-agent: [agent] coordinator_key: {e}", file=sys.stderr)
            return 2
    svc = AgentService(
        worker, cfg.transport, profile=cfg.profile, verifier=verifier,
        bundle_key=cfg.bundle_key, groups=("all", cfg.group) if cfg.group else ("all",),
        holdout=holdout,
    )  # fmt: skip
    signal.signal(signal.SIGTERM, lambda *_: svc.stop())  # systemd stop: finish cleanly
    try:
        svc.run()
    except KeyboardInterrupt:
        svc.stop()
    return 0


def check_npz(path: str, names: tuple[str, ...], what: str) -> None:
    """ValueError (naming ``what``, the file and the arrays found) unless ``path`` is an .npz
    holding ``names``; only the archive's index is read."""
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"{what}: expected an .npz file, cannot read {path}: {e}") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise ValueError(f"{what}: expected an .npz with arrays {', '.join(names)}, found a .npy")
    with z:
        if not set(names) <= set(z.files):
            raise ValueError(
                f"{what}: expected an .npz with arrays {', '.join(names)}, found arrays "
                f"{sorted(z.files)} in {path}"
            )


def _predict(args: argparse.Namespace) -> int:
    from device_agent.agent import AgentConfig
    from device_agent.inference import InferenceModel
    from device_agent.state import AgentState
    from edgefed.bundle.format import BundleError
    from edgefed.bundle.runner import BundleModel
    from edgefed.bundle.unpack import current

    try:
        state_dir = args.state_dir or AgentConfig.load(args.config).state_dir
        if args.state_dir:
            import json

            device = json.loads((Path(state_dir) / "state.json").read_text())["device_id"]
        else:
            device = AgentConfig.load(args.config).device_id
        if args.input.endswith(".npz"):
            check_npz(args.input, ("x",), "--input")
            with np.load(args.input, allow_pickle=False) as z:
                x = z["x"]
        else:
            x = np.load(args.input, allow_pickle=False)
        # A rolled-out bundle (verified at install) is the deployed model; the model of the
        # last federated round is the fallback for a device that never received one.
        bundle = current(Path(state_dir) / "bundles")
        if bundle is not None:
            version = bundle.manifest.model_version
            model = BundleModel(bundle.model_path, bundle.manifest)
            logits = model.predict(x, where=f"--input {args.input}")
        else:
            st = AgentState(state_dir, device)
            params, sha, version = st.load_model()
            _, manifest, inference = st.load_graph(sha)
            logits = InferenceModel(inference, manifest).predict(x, params)
    except BundleError as e:
        print(f"edgefed-agent predict: {e.reason}", file=sys.stderr)
        return 2
    except (OSError, ValueError, KeyError) as e:
        print(f"edgefed-agent predict: {e}", file=sys.stderr)
        return 2
    classes = logits.argmax(axis=1)
    if args.output:
        np.save(args.output, logits)
    else:
        print(f"model {version}: " + " ".join(str(int(c)) for c in classes))
    return 0


def predict_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgefed-agent predict", description="run the deployed model with onnxruntime"
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="agent TOML (its state_dir holds the model)")
    src.add_argument("--state-dir", help="agent state directory")
    p.add_argument("--input", required=True, help=".npy array or .npz with 'x'")
    p.add_argument("--output", help="write logits to this .npy (default: print classes)")
    return p


def agent_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgefed-agent",
        usage="edgefed-agent [-h] --config CONFIG [--log-level LEVEL]\n"
        "       edgefed-agent predict (--config CONFIG | --state-dir DIR) --input X",
        description="edgefed device agent: trains on its data when the coordinator asks, "
        "installs signed bundles.",
        epilog="commands:\n  predict   run the deployed model (the installed bundle, else the "
        "last\n            federated model) on an .npy/.npz: 'edgefed-agent predict --help'",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="agent TOML (see examples/agent.toml)")
    p.add_argument(
        "--log-level", default="INFO", metavar="LEVEL", help="DEBUG, INFO, WARNING or ERROR"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "predict":
        return _predict(predict_parser().parse_args(argv[1:]))
    args = agent_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return _run(args)


if __name__ == "__main__":
    sys.exit(main())
