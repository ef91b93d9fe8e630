"""Issue 14, item 9: every option of every command has help text, and ``edgefed-agent
--help`` lists its ``predict`` command. Walks the real argparse parsers (each sub-command's
own ``add_arguments``), so a new option without help fails here."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Iterator

from device_agent.cli import agent_parser, predict_parser
from edgefed.apps.cli import SUBCOMMANDS, build_parser

SKIP = (argparse._HelpAction, argparse._VersionAction)


def _missing(p: argparse.ArgumentParser, path: str) -> Iterator[str]:
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            helps = {c.dest: c.help for c in a._choices_actions}
            for name, sub in a.choices.items():
                if not helps.get(name):
                    yield f"{path} {name} (the command itself)"
                yield from _missing(sub, f"{path} {name}")
        elif not isinstance(a, SKIP) and (not a.help or a.help == argparse.SUPPRESS):
            yield f"{path} {'/'.join(a.option_strings) or a.dest}"


def test_every_option_of_every_command_has_help() -> None:
    missing = list(_missing(build_parser(None), "edgefed"))
    for name in SUBCOMMANDS:  # each sub-command's options are added only when chosen
        root = build_parser(name)
        (subs,) = [a for a in root._actions if isinstance(a, argparse._SubParsersAction)]
        missing += _missing(subs.choices[name], f"edgefed {name}")
    missing += _missing(agent_parser(), "edgefed-agent")
    missing += _missing(predict_parser(), "edgefed-agent predict")
    assert not missing, "options without help text:\n" + "\n".join(missing)
    assert len(SUBCOMMANDS) >= 9  # the walk saw the commands (not an empty table)


def test_agent_help_lists_predict() -> None:
    p = subprocess.run(
        [sys.executable, "-m", "device_agent.cli", "--help"], capture_output=True, text=True
    )
    assert p.returncode == 0, p.stderr
    assert "edgefed-agent predict" in p.stdout and "\n  predict " in p.stdout, p.stdout
    q = subprocess.run(
        [sys.executable, "-m", "device_agent.cli", "predict", "--help"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert q.returncode == 0 and "--input" in q.stdout and "--state-dir" in q.stdout, q.stdout
