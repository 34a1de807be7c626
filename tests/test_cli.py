"""The `sftrl` entry point: every subcommand has --help with an example; user errors are clean."""

import subprocess
import sys

import pytest

from sftrl_jax import cli


@pytest.mark.parametrize("name", [c for c, _, _ in cli.COMMANDS])
def test_every_command_has_help_with_example(name, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([name, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: sftrl {name}" in out
    assert "example" in out and f"sftrl {name}" in out.split("example", 1)[1]


def test_top_level_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "sftrl_jax.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for name, _, _ in cli.COMMANDS:
        assert name in out.stdout


def test_user_error_is_one_line_without_traceback(capsys):
    code = cli.main(["data", "gp", "--n", "0", "--out", "x.json"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == "sftrl data: error: --n must be positive, got 0"
