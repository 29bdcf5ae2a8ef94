"""The `qwen-relay` console script builds a command's parser from that command's module alone: the same flags
as in the whole CLI, without importing the other commands' torch, model code or gateway first."""

from __future__ import annotations

import subprocess
import sys

import pytest

from qwen_relay.server.cli import SUBCOMMANDS, build_parser


def _help(command: str | None, argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as done:
        build_parser(command).parse_args(argv)
    assert done.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", ["serve", *SUBCOMMANDS])
def test_each_command_alone_has_the_flags_of_the_whole_cli(command: str, capsys) -> None:
    alone = _help(command, [command, "--help"], capsys)
    assert alone == _help(None, [command, "--help"], capsys)
    assert alone.startswith(f"usage: qwen-relay {command} ")


def test_the_whole_cli_lists_every_command(capsys) -> None:
    listed = _help(None, ["--help"], capsys)
    for command in ["serve", *SUBCOMMANDS]:
        assert command in listed


@pytest.mark.slow
def test_client_and_serve_flags_are_read_without_torch() -> None:
    """`generate`, `chat` and `serve --help` answer at once: torch and transformers are not imported (5 s)."""
    check = ("import sys; from qwen_relay.server.cli import build_parser\n"
             "for command in ('generate', 'chat', 'serve'): build_parser(command)\n"
             "assert not {'torch', 'transformers', 'ray'} & set(sys.modules), sorted(sys.modules)")
    run = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-2000:]
