"""Multi-host RL: GRPO on 2 processes x 4 CPU devices logs the metrics of 1 process x 8 devices.

Each process steps only its share of the envs (env i on process i % 2; `episodes`), the sampler and
the update step are global programs over all 8 devices, and every process assembles the same
training batches (each device taking its own rows). The in-run evaluation runs on both processes;
process 0 writes metrics.jsonl and evals.jsonl, process 1 its copy of the metrics."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

from sftrl_jax import config
from sftrl_jax.rl.config import RLConfig
from sftrl_jax.rl.train import Trainer
from sftrl_jax.train.metrics import read_jsonl
from tests.rl.test_rl_train import TINY, untimed

# micro-batches of 8 shard over the 8-way fsdp axis (rl.config.check_mesh); 4 envs: 2 per process
OVER = {
    "algo": "grpo",
    "grpo": {"group_size": 2, "samples_per_step": 8, "micro_batch": 8},
    "eval": {"every": 2, "splits": ["id"], "episodes": 4, "batch_size": 4},
}


def _config(tmp_path, name):
    d = json.loads(json.dumps(TINY))
    d.update(OVER)
    d["train"] = {**d["train"], "run_dir": str(tmp_path / name), "updates": 2, "prompts_per_update": 4}
    del d["train"]["devices"]
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(d))
    return path


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _close(a, b, tol=1e-5):
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=tol, atol=tol, err_msg=k)


def test_two_processes_match_one_process(tmp_path):
    one = _config(tmp_path, "one")
    Trainer(config.load(RLConfig, one)).run()
    two = _config(tmp_path, "two")
    port = _free_port()
    procs = []
    for pid in range(2):
        env = dict(
            os.environ,
            XLA_FLAGS="--xla_force_host_platform_device_count=4",
            JAX_PLATFORMS="cpu",
            SFTRL_COORDINATOR=f"127.0.0.1:{port}",
            SFTRL_NUM_PROCESSES="2",
            SFTRL_PROCESS_ID=str(pid),
        )
        cmd = [sys.executable, "-m", "sftrl_jax.cli", "rl", "--config", str(two)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    ref = untimed(read_jsonl(tmp_path / "one" / "metrics.jsonl"))
    got = untimed(read_jsonl(tmp_path / "two" / "metrics.jsonl"))
    other = untimed(read_jsonl(tmp_path / "two" / "metrics.process1.jsonl"))
    assert len(ref) == len(got) == len(other) > 2  # 2 updates and the evaluations
    assert any("train/loss" in r for r in ref) and any(any(k.startswith("eval/") for k in r) for r in ref)
    for a, b in zip(ref, got):
        _close(a, b)
    for a, b in zip(got, other):  # both processes logged the same numbers
        _close(a, b, tol=0)
    evals = [{k: r[k] for k in ("step", "metric", "value")} for r in read_jsonl(tmp_path / "two" / "evals.jsonl")]
    assert evals == [
        {k: r[k] for k in ("step", "metric", "value")} for r in read_jsonl(tmp_path / "one" / "evals.jsonl")
    ]
    assert os.path.isdir(tmp_path / "two" / "final")
