"""The one config schema (edgefed/config/schema.py) as every role reads it: one line per
mistake naming file, table, key, what was expected and what was found; defaults only from
the dataclasses; paths relative to the config file; checks across tables; the strategy
(norm bound, DP) built from TOML; docs/configuration.md generated from the same schema."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest

from device_agent.agent import AgentConfig
from edgefed.config.docs import render
from edgefed.config.schema import ConfigError, FieldError
from edgefed.coordinator.config import CoordinatorConfig, ModelConfig
from edgefed.coordinator.rounds import RoundConfig
from edgefed.security.norm_bound import AdaptiveNormBound
from edgefed.sharding.config import ShardingConfig, WorkerConfig
from edgefed.transport import TransportConfig

ROOT = Path(__file__).resolve().parents[1]


def coordinator(tmp_path: Path, text: str, name: str = "coordinator.toml") -> CoordinatorConfig:
    p = tmp_path / name
    p.write_text(text)
    return CoordinatorConfig.load(p)


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as e:
        coordinator(tmp_path, text)
    msg = str(e.value)
    assert "\n" not in msg  # one line
    assert msg.startswith(f"{tmp_path / 'coordinator.toml'}: ")  # names the file
    return msg.split(": ", 1)[1]


def test_wrong_type_names_file_table_key_expected_and_found(tmp_path: Path) -> None:
    cases = [
        ('[coordinator]\nrounds = "3"\n',
         '[coordinator] rounds: expected an integer, found the string "3"'),
        ("[coordinator]\nrounds = 2.5\n",
         "[coordinator] rounds: expected an integer, found the number 2.5"),
        ("[training]\nlr = true\n", "[training] lr: expected a number, found the boolean true"),
        ("[compression]\nerror_feedback = 1\n",
         "[compression] error_feedback: expected true or false, found the integer 1"),
        ("[model]\nhead = 3\n",
         "[model] head: expected a string or a list of strings, found the integer 3"),
        ("[coordinator]\nfraction = 0\n",
         "[coordinator] fraction: expected a number above 0 and at most 1, found the integer 0"),
        ("[coordinator]\nrounds = 0\n",
         "[coordinator] rounds: expected an integer from 1 to 1000000, found the integer 0"),
        ("[training]\nlr = nan\n", "[training] lr: expected a finite number, found the number nan"),
        ('[model]\nbuiltin = "resnet"\n',
         '[model] builtin: expected one of "digits_mlp", "digits_cnn", found the string "resnet"'),
        ("[transport]\ninflight_window = 0\n",
         "[transport] inflight_window: expected an integer from 1 to 65535, found the integer 0"),
        ("[transport]\nchunk_size = 2048\nmax_message_bytes = 1024\n",
         "[transport] max_message_bytes: expected at least chunk_size (2048), found 1024"),
        ("[sharding]\nworkers = 0\n",
         "[sharding] workers: expected an integer from 1 to 10000, found the integer 0"),
        ("coordinator = 3\n", "[coordinator]: expected a table, found the integer 3"),
    ]  # fmt: skip
    for text, want in cases:
        assert error_of(tmp_path, text) == want


def test_unknown_keys_and_sections_list_what_is_allowed(tmp_path: Path) -> None:
    msg = error_of(tmp_path, "[coordinator]\nroundz = 3\n")
    assert msg.startswith("[coordinator] roundz: unknown key (expected one of rounds, ")
    assert "min_devices" in msg  # keys of RoundConfig read from the same table are listed
    msg = error_of(tmp_path, "[trainig]\nlr = 0.1\n")
    assert msg.startswith("[trainig]: unknown section (expected one of coordinator, model, ")
    assert error_of(tmp_path, '[strategy]\nname = "fedprox"\nmoo = 1.0\n').startswith(
        "[strategy] moo: unknown key (expected one of mu, server_lr, max_update_norm"
    )


def test_defaults_come_from_the_dataclasses() -> None:
    cfg = CoordinatorConfig.from_dict({})
    assert cfg.round == RoundConfig()  # no second copy of lr = 0.05 & co.
    assert cfg.transport == TransportConfig() and cfg.rounds == 20
    assert cfg.model.builtin == "digits_mlp" and cfg.model.loss == "cross_entropy"
    one = CoordinatorConfig.from_dict({"training": {"lr": 0.2}})
    assert one.round.lr == 0.2 and one.round.batch_size == RoundConfig().batch_size
    w = WorkerConfig.from_dict({"worker": {"id": "w"}})
    assert w.max_pending == WorkerConfig("w").max_pending and w.transport.session_expiry == 0
    assert ShardingConfig.from_dict({}) == ShardingConfig()


def test_python_built_objects_obey_the_same_rules() -> None:
    with pytest.raises(FieldError, match=r"\[transport\] keepalive: expected an integer from 5"):
        TransportConfig(keepalive=1)
    with pytest.raises(FieldError, match=r"\[sharding\] on_worker_loss: expected one of"):
        ShardingConfig(on_worker_loss="pray")
    with pytest.raises(FieldError, match=r"\[agent\] threads"):
        AgentConfig("d", "x.npz", threads=0)


def test_paths_resolve_against_the_config_file_and_must_exist(tmp_path: Path) -> None:
    sub = tmp_path / "conf"
    sub.mkdir()
    msg = error_of(sub, '[evaluation]\ndataset = "data/eval.npz"\n')
    assert msg == (
        f"[evaluation] dataset: expected an existing file, found nothing at {sub / 'data/eval.npz'}"
    )
    msg = error_of(sub, '[model]\ndir = "exported-model"\n')
    assert msg == (
        f"[model] dir: expected an existing directory, found nothing at {sub / 'exported-model'}"
    )
    msg = error_of(sub, '[security]\nsigning_key = "keys/coordinator.key"\n')
    assert msg == (
        "[security] signing_key: expected an existing file, found nothing at "
        f"{sub / 'keys/coordinator.key'}"
    )
    np.savez(sub / "wrong.npz", a=np.zeros(3), y=np.zeros(3))
    msg = error_of(sub, '[evaluation]\ndataset = "wrong.npz"\n')
    assert msg == (
        f"[evaluation] dataset: expected an .npz with arrays x and y, found arrays ['a', 'y'] "
        f"in {sub / 'wrong.npz'}"
    )
    np.savez(sub / "eval.npz", x=np.zeros((3, 2), np.float32), y=np.zeros(3, np.int64))
    (sub / "model").mkdir()
    (sub / "k.key").write_text("00" * 32)
    cfg = coordinator(
        sub,
        '[coordinator]\ncheckpoint = "state/c.npz"\n[model]\ndir = "model"\n'
        '[evaluation]\ndataset = "eval.npz"\n[security]\nsigning_key = "k.key"\n',
    )
    assert cfg.evaluation.dataset == str(sub / "eval.npz") and cfg.model["dir"] == str(
        sub / "model"
    )
    assert cfg.checkpoint == str(sub / "state/c.npz") and cfg.signing_key == str(sub / "k.key")
    assert "dir" in cfg.model and "builtin" not in cfg.model  # dict access for older callers


def test_agent_config_file_errors(tmp_path: Path) -> None:
    p = tmp_path / "agent.toml"
    p.write_text('[agent]\ndevice_id = "d1"\ndata = "d.npz"\n')
    with pytest.raises(ConfigError) as e:
        AgentConfig.load(p)
    assert str(e.value) == (
        f"{p}: [agent] data: expected an existing file, found nothing at {tmp_path / 'd.npz'}"
    )
    (tmp_path / "d.npz").write_bytes(b"")
    p.write_text('[agent]\ndevice_id = "d1"\ndata = "d.npz"\ncoordinator_key = "c.pub"\n')
    with pytest.raises(ConfigError) as e:
        AgentConfig.load(p)
    assert str(e.value) == (
        f"{p}: [agent] coordinator_key: expected an existing file, found nothing at "
        f"{tmp_path / 'c.pub'}"
    )
    p.write_text('[agent]\ndevice_id = "d1"\ndata = "d.npz"\nstate_dir = "st"\n')
    cfg = AgentConfig.load(p)
    assert cfg.data == str(tmp_path / "d.npz") and cfg.state_dir == str(tmp_path / "st")
    p.write_text('[agent]\ndevice_id = "d1"\ndata = "d.npz\n')  # unterminated string
    with pytest.raises(ConfigError, match=rf"^{p}: not valid TOML: "):
        AgentConfig.load(p)
    with pytest.raises(ConfigError, match=rf"^{tmp_path / 'nope.toml'}: no such file$"):
        AgentConfig.load(tmp_path / "nope.toml")


def test_model_factory_keys(tmp_path: Path) -> None:
    (tmp_path / "my_models.py").write_text("def make_net():\n    return None\n")
    cfg = coordinator(
        tmp_path,
        '[model]\nfactory = "my_models:make_net"\ninput_shape = [1, 28, 28]\n'
        'input_dtype = "int64"\nloss = "mse"\nnum_classes = 4\n',
    )
    m = cfg.model
    assert isinstance(m, ModelConfig) and m.builtin is None
    assert m.factory == f"{tmp_path / 'my_models.py'}:make_net"
    assert m.factory_file == str(tmp_path / "my_models.py") and m.factory_function == "make_net"
    assert (m.input_shape, m.input_dtype, m.loss, m.num_classes) == ([1, 28, 28], "int64", "mse", 4)
    assert m.get("input_dtype", "float32") == "int64" and m["factory"] == m.factory
    # An importable module stays a module name (found without importing it).
    mod = coordinator(tmp_path, '[model]\nfactory = "json:loads"\ninput_shape = [3]\n').model
    assert mod.factory == "json:loads" and mod.factory_file is None
    bad = [
        ('factory = "nowhere:make"\ninput_shape = [3]', "factory: expected a .py file beside the "
         f"config or an importable module, found neither {tmp_path / 'nowhere.py'} nor a module "
         '"nowhere"'),
        ('factory = "sub/m.py:make"\ninput_shape = [3]',
         f"factory: expected an existing file, found nothing at {tmp_path / 'sub/m.py'}"),
        ('factory = "my_models"\ninput_shape = [3]',
         'factory: expected "file.py:function" or "module:function", found "my_models"'),
        ('factory = "my_models:make_net"', "input_shape: expected a list of integers"),
        ('factory = "my_models:make_net"\ninput_shape = [3, 0]',
         "input_shape: expected a list of integers, each at least 1, found the list [3, 0]"),
        ('factory = "my_models:make_net"\ninput_shape = [3]\ninput_dtype = "float16"',
         'input_dtype: expected one of "float32", "int64", found the string "float16"'),
        ('factory = "my_models:make_net"\ninput_shape = [3]\nloss = "hinge"',
         "loss: expected one of"),
        ('builtin = "digits_cnn"\ninput_shape = [3]', "input_shape: only goes with factory"),
        ('builtin = "digits_cnn"\nfactory = "my_models:make_net"',
         "factory: expected only one of builtin, dir, factory, found builtin and factory"),
    ]  # fmt: skip
    for body, want in bad:
        assert error_of(tmp_path, f"[model]\n{body}\n").startswith(f"[model] {want}"), body


def test_strategy_with_norm_bounds_and_dp_is_built_from_toml(tmp_path: Path) -> None:
    cfg = coordinator(
        tmp_path,
        '[strategy]\nname = "fedadam"\nserver_lr = 0.02\n'
        "[strategy.norm_bound]\nfactor = 3.0\nmin_history = 2\n",
    )
    s1, s2 = cfg.make_strategy(), cfg.make_strategy()
    assert s1 is not s2 and s1.name == "fedadam" and s1.server_lr == 0.02
    assert isinstance(s1.norm_bound, AdaptiveNormBound) and s1.norm_bound is not s2.norm_bound
    assert s1.norm_bound.factor == 3.0 and s1.norm_bound.min_history == 2
    fixed = coordinator(tmp_path, '[strategy]\nname = "median"\nmax_update_norm = 5\n')
    s = fixed.make_strategy()
    assert s.max_update_norm == 5.0 and s.norm_bound is None and fixed.strategy["name"] == "median"
    dp = (
        '[strategy]\nname = "dp-fedavg"\nclip_norm = 1.0\nnoise_multiplier = 1.1\n'
        "expected_clients = 4\n"
    )
    c = coordinator(tmp_path, "[coordinator]\nfraction = 0.5\n" + dp)
    assert c.make_strategy().sample_rate == 0.5  # the accountant's rate is the real one
    assert error_of(tmp_path, "[coordinator]\nfraction = 0.5\n" + dp + "sample_rate = 0.1\n") == (
        "[strategy] sample_rate: expected at least [coordinator] fraction (0.5): a lower rate "
        "makes the accountant under-report epsilon, found 0.1"
    )
    assert error_of(tmp_path, '[strategy]\nname = "dp-fedavg"\nclip_norm = 1.0\n') == (
        "[strategy] noise_multiplier: expected a number, found nothing"
    )
    assert error_of(tmp_path, "[strategy.norm_bound]\nfactor = -1.0\n") == (
        "[strategy.norm_bound]: factor must be a positive number, got -1.0"
    )
    assert error_of(tmp_path, '[strategy]\nname = "fedavg"\nserver_lr = "1"\n') == (
        '[strategy] server_lr: expected a number, found the string "1"'
    )


def test_checks_across_tables_with_sharding(tmp_path: Path) -> None:
    cases = [
        ('[strategy]\nname = "median"', "[strategy] name: expected a linear strategy"),
        ('[strategy]\nname = "dp-fedavg"\nclip_norm = 1.0\nnoise_multiplier = 1.0\n'
         "expected_clients = 3", "[strategy] name: expected a linear strategy"),
        ("[strategy]\nmax_update_norm = 1.0",
         "[strategy] max_update_norm: cannot apply with [sharding]"),
        ("[strategy.norm_bound]\nfactor = 2.0",
         "[strategy.norm_bound]: the adaptive norm bound needs"),
    ]  # fmt: skip
    for body, want in cases:
        assert error_of(tmp_path, f"{body}\n[sharding]\nworkers = 2\n").startswith(want), body
    cfg = coordinator(tmp_path, '[sharding]\nworkers = 2\n[sharding.transport]\nusername = "agg"\n')
    assert cfg.sharding == ShardingConfig(workers=2) and cfg.sharding_transport is not None
    assert cfg.sharding_transport.username == "agg"
    assert error_of(tmp_path, "[sharding]\nworkers = 2\n[sharding.transport]\nusernam = 1\n") == (
        "[sharding.transport] usernam: unknown key (expected one of url, fleet, topic_prefix, "
        "protocol, username, password, tls, ca_file, cert_file, key_file, tls_insecure, "
        "keepalive, session_expiry, chunk_size, max_message_bytes, reassembly_memory, "
        "reassembly_timeout, inflight_window, backoff_min, backoff_max)"
    )


def test_worker_file(tmp_path: Path) -> None:
    p = tmp_path / "worker.toml"
    p.write_text('[worker]\nid = "agg-1"\nthreads = "2"\n')
    with pytest.raises(ConfigError) as e:
        WorkerConfig.load(p)
    assert str(e.value) == f'{p}: [worker] threads: expected an integer, found the string "2"'
    p.write_text('[worker]\nid = "agg/1"\n')
    with pytest.raises(ConfigError, match=rf"^{p}: \[worker\] id: invalid worker id 'agg/1'"):
        WorkerConfig.load(p)


def test_examples_load() -> None:
    cfg = CoordinatorConfig.load(ROOT / "examples" / "coordinator.toml")
    assert cfg.model.head == "last" and cfg.round.fraction == 0.5
    w = WorkerConfig.load(ROOT / "examples" / "worker.toml")
    assert w.worker_id == "agg-1" and w.transport.protocol == "5"
    agent = tomllib.loads((ROOT / "examples" / "agent.toml").read_text())
    assert AgentConfig.from_dict(agent).threads == 2  # its paths are a Pi's, checked on the Pi


def test_configuration_doc_is_generated_from_the_schema() -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text()
    assert doc == render(), "regenerate: python -m edgefed.config.docs > docs/configuration.md"
    # Every default the doc shows is the dataclass's (spot checks of each role).
    assert f"| `lr` | number | `{RoundConfig().lr}` |" in doc
    assert f"| `inflight_window` | integer | `{TransportConfig().inflight_window}` |" in doc
    assert f"| `max_pending` | integer | `{WorkerConfig('w').max_pending}` |" in doc
    assert "| `factor` | number | `2.0` |" in doc and "| `device_id` | string | `required` |" in doc
