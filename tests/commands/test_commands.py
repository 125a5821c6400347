"""One command pattern: every `kvshift` subcommand is a module of kvshift.commands with add_arguments and
run, every option has help text, and no library module parses arguments."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import pytest

import kvshift
from kvshift.cli import build_parser
from kvshift.commands import COMMANDS

SRC = Path(kvshift.__file__).resolve().parent


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_command_is_a_module_with_add_arguments_and_run(name):
    module = importlib.import_module(f"kvshift.commands.{name}")
    assert callable(module.add_arguments) and callable(module.run)
    parser = build_parser(name)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    for action in sub._actions:
        if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            assert action.help, f"kvshift {name} {action.option_strings or action.dest} has no help text"


def _options(parser: argparse.ArgumentParser, prefix: str):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _options(sub, f"{prefix} {sub_name}")
        elif not isinstance(action, argparse._HelpAction) and action.option_strings and not action.required:
            yield prefix, action, parser


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_option_shows_its_default(name):
    parser = build_parser(name)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    for where, action, owner in _options(sub, name):
        text = owner._get_formatter()._expand_help(action) if action.help else ""
        assert "default" in text.lower(), f"kvshift {where} {action.option_strings} does not say its default"
        assert "%(" not in text


def test_only_commands_and_the_dispatcher_use_argparse():
    offenders = [str(p.relative_to(SRC)) for p in SRC.rglob("*.py")
                 if "argparse" in p.read_text() and p.parent.name != "commands" and p.name != "cli.py"]
    assert offenders == []
