"""Config files that used to crash the CLI or load silently wrong (issue 23 items 7, 9): includes
that loop or are not paths, invalid UTF-8, a folder, duplicate keys, alias bombs. Each fails with one
line naming the file and the key, and the CLI exits 2 without a traceback."""

from __future__ import annotations

import time

import pytest

from sftrl_jax import cli, config
from sftrl_jax.sft.train import SFTConfig


def _error(path, *needles) -> str:
    with pytest.raises(config.ConfigError) as e:
        config.read_yaml(path)
    msg = str(e.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


def test_include_of_itself(tmp_path):
    a = tmp_path / "a.yaml"
    a.write_text("include: a.yaml\ntrain: {steps: 2}\n")
    _error(a, str(a), "includes itself", "a.yaml -> a.yaml")


def test_include_cycle_of_two(tmp_path):
    (tmp_path / "a.yaml").write_text("include: b.yaml\n")
    (tmp_path / "b.yaml").write_text("include: ./a.yaml\n")
    _error(tmp_path / "a.yaml", "a.yaml -> ", "b.yaml -> ", "includes itself")


def test_include_chain_without_a_cycle_is_fine(tmp_path):
    (tmp_path / "c.yaml").write_text("train: {steps: 3, log_every: 1}\n")
    (tmp_path / "b.yaml").write_text("include: c.yaml\ntrain: {steps: 2}\n")
    (tmp_path / "a.yaml").write_text("include: b.yaml\n")
    (tmp_path / "d.yaml").write_text("include: b.yaml\n")  # two files may include the same one
    assert config.read_yaml(tmp_path / "a.yaml") == {"train": {"steps": 2, "log_every": 1}}


@pytest.mark.parametrize("value", ["5", "[a.yaml]", "{x: 1}", "true"])
def test_include_must_be_a_path(tmp_path, value):
    a = tmp_path / "a.yaml"
    a.write_text(f"include: {value}\n")
    _error(a, str(a), "'include' must be a file path")


def test_invalid_utf8(tmp_path):
    a = tmp_path / "a.yaml"
    a.write_bytes(b"train:\n  steps: 2\n  run_dir: r\xff\xfe\n")
    _error(a, str(a), "not valid UTF-8", "byte 0xff")


def test_a_folder(tmp_path):
    _error(tmp_path, str(tmp_path), "is a folder")


def test_include_of_a_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.yaml").write_text("include: sub\n")
    _error(tmp_path / "a.yaml", "sub", "is a folder")


def test_duplicate_keys_are_refused(tmp_path):
    a = tmp_path / "a.yaml"
    a.write_text("train:\n  steps: 2\noptim:\n  lr: 1.0e-3\ntrain:\n  steps: 5\n")
    _error(a, str(a), "key 'train' appears twice", "lines 1 and 5")


def test_nested_duplicate_keys_are_refused(tmp_path):
    a = tmp_path / "a.yaml"
    a.write_text("optim: {lr: 1.0e-3, b1: 0.9, lr: 2.0e-3}\n")
    _error(a, str(a), "key 'lr' appears twice")


def test_merge_keys_and_anchors_still_work(tmp_path):
    a = tmp_path / "a.yaml"
    a.write_text("base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  y: 3\nlist: [*b, *b]\n")
    assert config.read_yaml(a) == {"base": {"x": 1, "y": 2}, "other": {"x": 1, "y": 3}, "list": [{"x": 1, "y": 2}] * 2}


def _bomb(levels: int) -> str:
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("levels", [7, 9])
def test_alias_bomb_fails_fast(tmp_path, levels):
    a = tmp_path / "a.yaml"
    a.write_text(_bomb(levels))  # 10**levels leaves once expanded
    t0 = time.perf_counter()
    _error(a, str(a), "aliases")
    assert time.perf_counter() - t0 < 1.0


def test_recursive_alias(tmp_path):
    a = tmp_path / "a.yaml"
    a.write_text("a: &a [*a]\n")
    _error(a, str(a))


def test_deep_nesting(tmp_path):
    a = tmp_path / "a.yaml"
    a.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    _error(a, str(a), "nested")


@pytest.mark.parametrize(
    "content",
    [b"include: sft.yaml\n", b"train: {run_dir: \xff}\n", b"train: 1\ntrain: 2\n", b"include: 5\n"],
)
def test_cli_exits_2_with_one_line(tmp_path, capsys, content):
    path = tmp_path / "sft.yaml"
    path.write_bytes(content)
    code = cli.main(["sft", "--config", str(path)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err and str(path) in err, err


def test_cli_config_folder(tmp_path, capsys):
    code = cli.main(["sft", "--config", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "is a folder" in err, err


def test_load_names_the_file(tmp_path):
    path = tmp_path / "sft.yaml"
    path.write_text("train: {steps: 2}\ntrain: {steps: 3}\n")
    with pytest.raises(config.ConfigError, match="sft.yaml"):
        config.load(SFTConfig, path)
