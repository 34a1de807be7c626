"""tools/bench.py: subcommand structure, the verifier benchmark's last line, the BENCHMARKS.md record."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "tools" / "bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("sftrl_bench", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # our own tool file, not model text
    return module


def test_verifier_last_line(bench, capsys):
    args = ["verifier", "--no-record", "--seconds", "0.05", "--hands", "300", "--deals", "50"]
    assert bench.main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("verifier answers/s: ")
    assert int(lines[-1].split(": ")[1]) > 1000
    assert any(line.startswith("deal ms (CPU) per solvable hand") for line in lines)


def test_record_appends(bench, tmp_path):
    path = tmp_path / "docs" / "BENCHMARKS.md"
    bench.record("verifier", "python tools/bench.py verifier", ["a: 1"], path=path)
    bench.record("verifier", "python tools/bench.py verifier", ["a: 2"], path=path)
    text = path.read_text()
    assert text.startswith("# Benchmarks") and text.count("## verifier") == 2
    assert "Command: `python tools/bench.py verifier`" in text and "- a: 2" in text
