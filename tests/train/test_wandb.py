"""Weights & Biases logging (`train.wandb=true`), offline: the run folder holds the logged metrics.

The offline run's `.wandb` file is read back with a small reader of its record log (the LevelDB log
format wandb writes: a 7-byte header, then 32 KiB blocks of records with 7-byte headers, each record
a `wandb_internal_pb2.Record`): wandb's own reader is gone from its Python package since the
backend moved to wandb-core, and an offline run writes no `wandb-summary.json`.
"""

import glob
import json
import os
import struct
import sys
import time

import numpy as np
import pytest

from sftrl_jax.config import ConfigError
from sftrl_jax.train import metrics
from sftrl_jax.train.run import RunSection

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402

_BLOCK, _HEADER = 32768, 7  # LevelDB log: block size, record header (crc32 4, length 2, type 1)
_FULL, _LAST = 1, 4


def _records(path: str) -> list:
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B", f"{path}: not a wandb run file"
    records, pos, chunk = [], _HEADER, b""  # the file's own 7-byte header (":W&B", magic, version)
    while pos + _HEADER <= len(data):
        if _BLOCK - pos % _BLOCK < _HEADER:  # a block's tail too short for a header is padding
            pos += _BLOCK - pos % _BLOCK
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        chunk += data[pos + _HEADER : pos + _HEADER + n]
        pos += _HEADER + n
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def _finished_records(path: str, timeout: float = 10.0) -> list:
    """The records of a finished run's file: `run.finish()` returns before wandb-core has written
    them (the file holds only its header then), so wait for the run's exit record."""
    deadline = time.monotonic() + timeout
    while True:
        records = _records(path)
        if records and records[-1].WhichOneof("record_type") == "exit":
            return records
        assert time.monotonic() < deadline, f"{path}: no exit record after {timeout} s"
        time.sleep(0.05)


def _offline_runs(run_dir) -> list[dict]:
    """Each offline run in `run_dir/wandb`, oldest first: its id, config and history rows."""
    runs = []
    for folder in sorted(glob.glob(os.path.join(run_dir, "wandb", "offline-run-*"))):
        (path,) = glob.glob(os.path.join(folder, "*.wandb"))
        run = {"folder": folder, "id": None, "config": {}, "history": []}
        for r in _finished_records(path):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                run["id"] = r.run.run_id
                run["config"] = {i.key: json.loads(i.value_json) for i in r.run.config.update}
            elif kind == "history":
                run["history"].append(
                    {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                )
        runs.append(run)
    return runs


def _figures(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("_")}  # less wandb's _step, _runtime, ...


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """wandb with no account, no network and nothing written outside tmp_path."""
    for key in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_PROJECT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    for key in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(key, str(tmp_path / "wandb_home"))
    return monkeypatch


def test_wandb_offline_logs_to_the_run_folder(offline, tmp_path):
    offline.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path / "run"
    config = {"train": {"seed": 3, "wandb": True}, "optim": {"lr": 1e-5}}
    with metrics.MetricsWriter(run_dir, wandb=True, wandb_project="sftrl-test", config=config) as log:
        log.write(1, {"loss": np.float32(0.5), "bad": float("nan")}, prefix="train")
        log.write(2, {"loss": 0.25, "lr": 1e-3}, prefix="train")
        log.write(2, {"loss": 0.75}, prefix="eval")  # a second row at the same step merges into it

    assert [r["step"] for r in metrics.read_jsonl(run_dir / "metrics.jsonl")] == [1, 2, 2]  # the jsonl as before
    (run,) = _offline_runs(run_dir)
    with open(run_dir / metrics.WANDB_ID_FILE) as f:
        assert run["id"] == f.read().strip()
    assert run["config"]["train"] == {"seed": 3, "wandb": True} and run["config"]["optim"] == {"lr": 1e-5}
    # the finite scalars, named as in the jsonl and TensorBoard, at the run's steps; NaN left out
    assert [r["_step"] for r in run["history"]] == [1, 2]
    assert [_figures(r) for r in run["history"]] == [
        {"train/loss": 0.5},
        {"train/loss": 0.25, "train/lr": 1e-3, "eval/loss": 0.75},
    ]


def test_wandb_resume_continues_the_run_id_offline_by_default(offline, tmp_path):
    run_dir = tmp_path / "run"  # no WANDB_MODE and no WANDB_API_KEY: offline, never the network
    with metrics.MetricsWriter(run_dir, wandb=True) as log:
        log.write(1, {"loss": 1.0}, prefix="train")
    with open(run_dir / metrics.WANDB_ID_FILE) as f:
        run_id = f.read().strip()
    with metrics.MetricsWriter(run_dir, wandb=True) as log:  # the resumed run
        log.write(2, {"loss": 0.5}, prefix="train")

    first, second = _offline_runs(run_dir)
    assert first["id"] == second["id"] == run_id and len(run_id) == 8
    assert [(r["_step"], _figures(r)) for r in first["history"] + second["history"]] == [
        (1, {"train/loss": 1.0}),
        (2, {"train/loss": 0.5}),
    ]
    with open(run_dir / metrics.WANDB_ID_FILE) as f:
        assert f.read().strip() == run_id


def test_wandb_missing_is_one_line_config_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(ConfigError) as e:
        metrics.MetricsWriter(tmp_path, wandb=True)
    assert str(e.value) == "train.wandb=true needs wandb: pip install 'sftrl_jax[wandb]'"
    assert not os.path.exists(tmp_path / metrics.WANDB_ID_FILE)
    with metrics.MetricsWriter(tmp_path) as log:  # off: no wandb needed
        log.write(1, {"loss": 1.0})


def test_run_section_wandb_keys():
    assert RunSection().wandb is False and RunSection().wandb_project == "sftrl"
    with pytest.raises(ConfigError, match="train.wandb_project"):
        RunSection(wandb=True, wandb_project=" ")
