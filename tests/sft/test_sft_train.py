"""SFT end to end on a tiny Llama: loss falls, SIGKILL + resume is bitwise exact, 8 devices == 1,
2 processes x 4 devices == 1 x 8, non-finite steps are skipped then abort the run."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from sftrl_jax import config
from sftrl_jax.data.generate import generate_gp_sft
from sftrl_jax.errors import UserError
from sftrl_jax.models.checkpoint import load_checkpoint
from sftrl_jax.sft.train import SFTConfig, train
from sftrl_jax.train.metrics import read_jsonl

TINY = {
    "model": {
        "preset": "llama-tiny",
        "text_overrides": {
            "vocab_size": 2048,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_layers": 1,
            "num_heads": 2,
            "num_kv_heads": 1,
            "head_dim": 32,
        },
    },
    "data": {"max_length": 256, "buckets": [256], "batch_size": 8},
    "optim": {"lr": 3.0e-3, "warmup_ratio": 0.0},
    "train": {"steps": 8, "log_every": 1, "save_every": 2, "progress": False, "async_checkpointing": False},
}


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sftdata") / "gp_l.json"
    generate_gp_sft("gp-l", "train", 96, str(path), seed=0)
    return str(path)


def make_cfg(tmp_path, data_file, run, **over):
    d = json.loads(json.dumps(TINY))
    d["data"]["train_files"] = [data_file]
    d["train"]["run_dir"] = str(tmp_path / run)
    for k, v in over.items():
        section, key = k.split("__")
        d[section][key] = v
    p = tmp_path / f"{run}.yaml"
    p.write_text(json.dumps(d))
    return config.load(SFTConfig, p), p


def params_of(run_dir, ckpt="final"):
    model = load_checkpoint(os.path.join(run_dir, ckpt))
    from flax import nnx

    return {k: np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))}


def losses(run_dir, name="metrics.jsonl"):
    return [r["train/loss"] for r in read_jsonl(os.path.join(run_dir, name))]


KILL_AFTER_SAVE = textwrap.dedent("""
    import os, signal, sys
    from sftrl_jax import config
    from sftrl_jax.sft.train import SFTConfig, train
    from sftrl_jax.train import checkpoint
    save = checkpoint.Checkpointer.save
    def save_then_die(self, step, *a, **k):
        out = save(self, step, *a, **k)
        if step == {kill_step}:
            self.wait()
            os.kill(os.getpid(), signal.SIGKILL)  # a hard crash right after the checkpoint landed
        return out
    checkpoint.Checkpointer.save = save_then_die
    train(config.load(SFTConfig, sys.argv[1]))
""")


@pytest.mark.slow  # 70 s cold; SFT SIGKILL resume stays in the default suite mid-save (test_sft_faults)
def test_loss_falls_and_sigkill_resume_is_bitwise(tmp_path, data_file):
    cfg, _ = make_cfg(tmp_path, data_file, "full")
    train(cfg)
    full = losses(cfg.train.run_dir)
    assert len(full) == 8 and full[-1] < full[0] - 0.5, full

    cfg2, path2 = make_cfg(tmp_path, data_file, "killed")
    code = KILL_AFTER_SAVE.format(kill_step=4)
    proc = subprocess.run([sys.executable, "-c", code, str(path2)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not os.path.exists(os.path.join(cfg2.train.run_dir, "final"))
    train(cfg2)  # resumes from step 4
    a, b = params_of(cfg.train.run_dir), params_of(cfg2.train.run_dir)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=str(k))
    resumed = losses(cfg2.train.run_dir)
    assert resumed[:4] + resumed[-4:] == full  # steps 1-4 before the kill, 5-8 after


@pytest.mark.slow  # 43 s cold; the sharded SFT step stays in the default suite (test_scan_layers on eight devices)
def test_eight_devices_match_one(tmp_path, data_file):
    assert jax.device_count() == 8
    cfg8, _ = make_cfg(tmp_path, data_file, "d8", train__steps=3)
    cfg1, _ = make_cfg(tmp_path, data_file, "d1", train__steps=3, train__devices=1)
    train(cfg8)
    train(cfg1)
    np.testing.assert_allclose(losses(cfg8.train.run_dir), losses(cfg1.train.run_dir), rtol=1e-5, atol=1e-5)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # ~50 s; moved out of the default suite (15-minute budget), `make test-slow`
def test_two_processes_match_one_process(tmp_path, data_file):
    cfg8, _ = make_cfg(tmp_path, data_file, "one", train__steps=3)
    train(cfg8)
    _, path = make_cfg(tmp_path, data_file, "two", train__steps=3)
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
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "sftrl_jax.cli", "sft", "--config", str(path)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    run = str(tmp_path / "two")
    np.testing.assert_allclose(losses(run), losses(cfg8.train.run_dir), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(losses(run, "metrics.process1.jsonl"), losses(run), rtol=0, atol=0)


def test_nonfinite_steps_are_skipped_then_abort(tmp_path, data_file):
    cfg, _ = make_cfg(
        tmp_path, data_file, "nan", optim__lr=1.0e30, optim__grad_clip=None, train__max_bad_steps=2, train__devices=1
    )
    with pytest.raises(UserError, match=r"2 steps in a row had non-finite gradients"):
        train(cfg)
    rows = read_jsonl(os.path.join(cfg.train.run_dir, "metrics.jsonl"))
    assert rows[0]["train/finite"] == 1.0 and rows[-1]["train/skipped_nonfinite"] >= 1


@pytest.mark.slow  # 30 s cold; RL snapshots stay in the default suite
def test_snapshots_every_n_steps_survive_resume_and_the_last_equals_final(tmp_path, data_file):
    """train.snapshot_every=2 over 4 steps, interrupted after step 2 and resumed: model checkpoints
    snapshots/2 and snapshots/4 (none at step 0); the resumed run leaves snapshots/2 as it was;
    snapshots/4 is bit for bit the final model, snapshots/2 an earlier one."""
    cfg, _ = make_cfg(tmp_path, data_file, "snap", train__steps=4, train__snapshot_every=2, train__devices=1)
    run = cfg.train.run_dir
    train(cfg, stop_after=2)
    assert os.listdir(os.path.join(run, "snapshots")) == ["2"]
    written = os.stat(os.path.join(run, "snapshots", "2", "model_config.json")).st_mtime_ns
    train(cfg)  # resumes at step 2
    assert sorted(os.listdir(os.path.join(run, "snapshots"))) == ["2", "4"]
    assert os.stat(os.path.join(run, "snapshots", "2", "model_config.json")).st_mtime_ns == written
    final, four, two = params_of(run), params_of(run, "snapshots/4"), params_of(run, "snapshots/2")
    assert final.keys() == four.keys() == two.keys()
    for k in final:
        np.testing.assert_array_equal(four[k], final[k], err_msg=str(k))
    assert any(not np.array_equal(two[k], four[k]) for k in final)


def test_snapshot_every_is_validated_and_off_by_default():
    from sftrl_jax.config import ConfigError
    from sftrl_jax.sft.train import TrainSection
    from sftrl_jax.train.checkpoint import snapshot_path

    assert TrainSection().snapshot_every == 0
    assert [snapshot_path("r", s, every=0) for s in range(4)] == [None] * 4
    assert [snapshot_path("r", s, every=2) for s in range(5)] == [None, None, "r/snapshots/2", None, "r/snapshots/4"]
    with pytest.raises(ConfigError, match=r"train\.snapshot_every must be >= 0 .*got -1"):
        TrainSection(snapshot_every=-1)
