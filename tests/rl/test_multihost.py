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
import pytest

from sftrl_jax import config
from sftrl_jax.rl.config import RLConfig
from sftrl_jax.rl.train import Trainer
from sftrl_jax.train.metrics import read_jsonl
from sftrl_jax.train.run import ADAPTER_DIR
from tests.rl.test_rl_train import TINY, untimed

# micro-batches of 8 shard over the 8-way fsdp axis (rl.config.check_mesh); 4 envs: 2 per process
OVER = {
    "algo": "grpo",
    "grpo": {"group_size": 2, "samples_per_step": 8, "micro_batch": 8},
    "eval": {"every": 2, "splits": ["id"], "episodes": 4, "batch_size": 4},
}


def _config(tmp_path, name, lora=None):
    d = json.loads(json.dumps(TINY))
    d.update(OVER)
    if lora:
        d["lora"] = lora
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


@pytest.mark.slow  # ~3 min on 2 cores: three runs' compiles
# lora: the frozen base sharded as without adapters, the gradients and the optimiser state of the
# rank-4 adapters only (models/lora.py); final/ holds the merged model and the adapters
@pytest.mark.parametrize("lora", [None, {"rank": 4, "alpha": 8}], ids=["full", "lora"])
def test_two_processes_match_one_process(tmp_path, lora):
    one = _config(tmp_path, "one", lora)
    Trainer(config.load(RLConfig, one)).run()
    two = _config(tmp_path, "two", lora)
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
    gap = max(abs(a[k] - b[k]) for a, b in zip(ref, got) for k in a if isinstance(a[k], float) and a[k] == a[k])
    print(f"largest |1 x 8 - 2 x 4| over {len(ref)} metric rows: {gap:.3g}")
    for a, b in zip(got, other):  # both processes logged the same numbers
        _close(a, b, tol=0)
    evals = [{k: r[k] for k in ("step", "metric", "value")} for r in read_jsonl(tmp_path / "two" / "evals.jsonl")]
    assert evals == [
        {k: r[k] for k in ("step", "metric", "value")} for r in read_jsonl(tmp_path / "one" / "evals.jsonl")
    ]
    assert os.path.isdir(tmp_path / "two" / "final")
    assert os.path.isdir(tmp_path / "two" / "final" / ADAPTER_DIR) == bool(lora)


def test_runner_shares_envs_between_processes(monkeypatch):
    """Two runners in threads stand for two processes (`share`, a barrier all-gather): each env is
    reset and stepped only by its owner, and both see the turns and state of one process's runner."""
    import threading

    from sftrl_jax import episodes
    from sftrl_jax.data.tokenizer import load_tokenizer
    from tests.rl.test_rollout import Countdown, scripted

    tok = load_tokenizer()
    slots, barrier = [None, None], threading.Barrier(2)
    rank = threading.local()

    def allgather(obj):
        slots[rank.value] = obj
        barrier.wait()
        out = list(slots)
        barrier.wait()
        return out

    monkeypatch.setattr(episodes.distributed, "allgather_objects", allgather)

    class Owned(Countdown):
        def __init__(self, owner):
            super().__init__()
            self.owner, self.calls = owner, 0

        def reset(self, **kw):
            assert rank.value == self.owner
            self.calls += 1
            return super().reset(**kw)

        def step(self, text):
            assert rank.value == self.owner
            self.calls += 1
            return super().step(text)

    def answers(ep, fails):
        return "ok" if fails >= ep % 3 else "no"

    def play(envs, share):
        runner = episodes.EpisodeRunner(envs, tok, scripted(tok, answers)[0], share=share)
        turns = [t for row in episodes.collect(runner, 5) for t in row]
        return [(t.env_index, t.episode, t.turn, t.text, t.reward, t.done) for t in turns], runner.state()

    ref = play([Countdown() for _ in range(3)], (0, 1))
    results, envs = [None, None], [[Owned(i % 2) for i in range(3)] for _ in range(2)]

    def worker(r):
        rank.value = r
        results[r] = play(envs[r], (r, 2))

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results[0] == results[1] == ref
    assert [e.calls > 0 for e in envs[0]] == [True, False, True] and [e.calls > 0 for e in envs[1]] == [
        False,
        True,
        False,
    ]
