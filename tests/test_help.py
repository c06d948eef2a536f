"""``ptmrec COMMAND --help`` ends with the command's example (``cli.EXAMPLES``) and the exit codes;
every example names only options its subcommand accepts."""

from __future__ import annotations

import argparse
import shlex

import pytest

from ptmrec_dist.cli import COMMANDS, EXAMPLES, OVERRIDE, build_parser, main

CODES = ["0  done", "1  failed", "2  bad input", "3  stopped by a signal"]


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_subcommand_has_an_example():
    assert set(EXAMPLES) == set(COMMANDS) == set(subparsers(build_parser()))


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_shows_the_example_and_the_exit_codes(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    tail = out[out.index("example:"):]
    assert EXAMPLES[command] in tail          # verbatim: RawDescriptionHelpFormatter
    assert all(code in tail for code in CODES), tail


def test_top_level_help_lists_the_exit_codes(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert all(code in out for code in CODES) and "COMMAND --help" in out


@pytest.mark.parametrize("command", sorted(EXAMPLES))
def test_example_parses_with_its_subcommand(command):
    words = shlex.split(EXAMPLES[command])
    assert words[:2] == ["ptmrec", command]
    args, extra = subparsers(build_parser())[command].parse_known_args(words[2:])
    assert all(OVERRIDE.match(x) for x in extra), extra
    # the whole line as main() parses it (flags, positionals, overrides together)
    args, extra = build_parser().parse_known_args(words[1:])
    assert args.command == command and all(OVERRIDE.match(x) for x in extra), extra
