"""SFT fault paths end to end (issue 23): SIGKILL while a checkpoint is being written, SIGTERM from
outside, a truncated latest checkpoint. Each resumed run ends with the parameters of an uninterrupted
run, bit for bit, and a metrics.jsonl with every step once."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from sftrl_jax.sft.train import train
from sftrl_jax.train import checkpoint as ckpt_lib
from sftrl_jax.train.metrics import read_jsonl
from tests.sft.test_sft_train import data_file, losses, make_cfg, params_of  # noqa: F401 (fixture)

STEPS = 8


@pytest.fixture(scope="module")
def xla_env(tmp_path_factory):
    """A persistent XLA cache for this module: the later runs, in process or in a child (given these
    environment variables), reuse the first run's executables instead of compiling them again."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    path = str(tmp_path_factory.mktemp("xla_cache"))
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    before = {k: getattr(jax.config, k) for k in keys}
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    compilation_cache.reset_cache()
    yield dict(os.environ, JAX_COMPILATION_CACHE_DIR=path, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    for k, v in before.items():
        jax.config.update(k, v)
    compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def full(tmp_path_factory, data_file, xla_env):  # noqa: F811
    cfg, _ = make_cfg(tmp_path_factory.mktemp("sft_full"), data_file, "full")
    train(cfg)
    return losses(cfg.train.run_dir), params_of(cfg.train.run_dir)


def _steps(run_dir):
    return [r["step"] for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if "train/loss" in r]


def _same_as_full(run_dir, full):
    want_losses, want = full
    assert _steps(run_dir) == list(range(1, STEPS + 1))  # each step once, in order
    assert losses(run_dir) == want_losses
    got = params_of(run_dir)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=str(k))


# The child dies inside orbax's write of the checkpoint of `kill_step`: the JSON item ("extra") is
# half-written into the step's temporary folder when the process is SIGKILLed.
KILL_DURING_SAVE = textwrap.dedent("""
    import json, os, signal, sys
    from orbax.checkpoint._src.handlers import json_checkpoint_handler as J
    from sftrl_jax import config
    from sftrl_jax.train import checkpoint
    armed = []
    save = checkpoint.Checkpointer.save
    def save_armed(self, step, *a, **k):
        if step == {kill_step}:
            armed.append(step)
        return save(self, step, *a, **k)
    checkpoint.Checkpointer.save = save_armed
    write = J.JsonCheckpointHandler._save_fn
    async def die_while_writing(self, x, directory):
        if armed:
            (directory / self._filename).write_text(json.dumps(x)[:7])
            with open(sys.argv[2], "w") as f:
                f.write(str(directory))
            os.kill(os.getpid(), signal.SIGKILL)
        return await write(self, x, directory)
    J.JsonCheckpointHandler._save_fn = die_while_writing
    {run}
""")
RUN_SFT = "from sftrl_jax.sft.train import SFTConfig, train; train(config.load(SFTConfig, sys.argv[1]))"


def test_sigkill_while_a_checkpoint_is_written(tmp_path, data_file, full, xla_env):  # noqa: F811
    cfg, path = make_cfg(tmp_path, data_file, "killed")
    code = KILL_DURING_SAVE.format(kill_step=4, run=RUN_SFT)
    marker = tmp_path / "writing"
    proc = subprocess.run(
        [sys.executable, "-c", code, str(path), str(marker)], capture_output=True, text=True, timeout=600, env=xla_env
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    partial = marker.read_text()
    assert os.path.isdir(partial) and os.path.basename(os.path.dirname(partial)) != "4"  # a temporary folder
    with ckpt_lib.Checkpointer(os.path.join(cfg.train.run_dir, "checkpoints"), async_save=False) as ck:
        assert ck.latest_step() == 2  # step 4 never landed
    assert _steps(cfg.train.run_dir) == [1, 2, 3, 4]  # logged before the kill
    train(cfg)  # resumes from step 2: steps 3 and 4 are logged again, once
    _same_as_full(cfg.train.run_dir, full)


@pytest.mark.slow  # ~50 s; moved out of the default suite (15-minute budget), `make test-slow`
def test_truncated_latest_checkpoint(tmp_path, data_file, full, capsys):  # noqa: F811
    cfg, _ = make_cfg(tmp_path, data_file, "truncated")
    train(cfg, stop_after=6)
    directory = os.path.join(cfg.train.run_dir, "checkpoints")
    files = glob.glob(os.path.join(directory, "6", "state", "**", "d", "*"), recursive=True)
    for p in files:
        with open(p, "r+b") as f:
            f.truncate(os.path.getsize(p) // 2)
    capsys.readouterr()
    train(cfg)
    out = capsys.readouterr().out
    assert f"checkpoint: skipping step 6 of {directory}: it does not restore (" in out, out
    assert f"moved the skipped step 6 to {directory}.skipped/6 (kept, not deleted)" in out
    assert f"sft: resumed {cfg.train.run_dir} at step 4" in out
    assert sorted(os.listdir(directory + ".skipped/6")) == sorted(os.listdir(os.path.join(directory, "4")))
    _same_as_full(cfg.train.run_dir, full)


# Steps slowed to ~0.4 s so that the test's SIGTERM arrives mid-run.
SLOW = textwrap.dedent("""
    import sys, time
    from sftrl_jax import config
    from sftrl_jax.train import checkpoint
    maybe_save = checkpoint.Checkpointer.maybe_save
    def slow(self, *a, **k):
        time.sleep(0.4)
        return maybe_save(self, *a, **k)
    checkpoint.Checkpointer.maybe_save = slow
    {run}
""")


def sigterm_after(code: str, config_path, metrics_path, *, rows: int, env=None) -> subprocess.CompletedProcess:
    """Runs `code` in a child and sends it SIGTERM once `metrics_path` holds `rows` rows."""
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(config_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and child.poll() is None:
        if os.path.exists(metrics_path) and len(read_jsonl(metrics_path)) >= rows:
            child.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    out, err = child.communicate(timeout=600)
    return subprocess.CompletedProcess(child.args, child.returncode, out, err)


@pytest.mark.slow  # ~50 s; moved out of the default suite (15-minute budget), `make test-slow`
def test_sigterm_end_to_end(tmp_path, data_file, full, xla_env):  # noqa: F811
    cfg, path = make_cfg(tmp_path, data_file, "sigterm")
    code = SLOW.format(run=RUN_SFT)
    proc = sigterm_after(code, path, os.path.join(cfg.train.run_dir, "metrics.jsonl"), rows=3, env=xla_env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(x for x in proc.stdout.splitlines() if "SIGTERM received" in x)
    saved = int(line.split("saved step ")[1].split()[0])
    assert 3 <= saved < STEPS, line
    assert not os.path.exists(os.path.join(cfg.train.run_dir, "final"))
    with ckpt_lib.Checkpointer(os.path.join(cfg.train.run_dir, "checkpoints"), async_save=False) as ck:
        assert ck.latest_step() == saved
    assert _steps(cfg.train.run_dir) == list(range(1, saved + 1))
    train(cfg)
    _same_as_full(cfg.train.run_dir, full)


# Disk full (issue 32 item 4): making a checkpoint's folder (or the model's `final.partial`) fails with
# ENOSPC. Orbax's writer threads then wait ~5 minutes for that folder, and used to hold the process
# at exit; the error came a save late, as 751 lines of tracebacks with exit 1.
DISK_FULL = textwrap.dedent("""
    import errno, os, sys
    from orbax.checkpoint._src.path import atomicity
    from sftrl_jax import cli
    create = atomicity._create_paths
    async def full_disk(tmp_paths, *a, **k):
        if any(sys.argv[2] in str(p.get()) for p in tmp_paths):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return await create(tmp_paths, *a, **k)
    atomicity._create_paths = full_disk
    sys.exit(cli.main(["sft", "--config", sys.argv[1]]))
""")


@pytest.mark.slow  # ~45 s and ~30 s (a child run, then the resume); the default suite has the fast
# checks of the same paths in tests/train/test_save_faults.py
@pytest.mark.parametrize("where", ["checkpoint", "final"])
def test_disk_full_stops_at_once_with_one_line_and_the_run_resumes(tmp_path, data_file, full, xla_env, where):  # noqa: F811
    cfg, path = make_cfg(tmp_path, data_file, where, train__async_checkpointing=True)
    run = cfg.train.run_dir
    marker = os.path.join(run, "checkpoints", "4.") if where == "checkpoint" else os.path.join(run, "final.partial")
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", DISK_FULL, str(path), marker], capture_output=True, text=True, timeout=600, env=xla_env
    )
    elapsed = time.monotonic() - t0
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert elapsed < 200, elapsed  # orbax's writer threads would hold it 300 s more
    if where == "checkpoint":
        what, kept = f"checkpoint save to {run}/checkpoints/4", 2
        tail = " (the checkpoints before it are kept; the same command resumes from the latest)"
        assert _steps(run) in ([1, 2, 3, 4], [1, 2, 3, 4, 5])  # stopped before the next save (6)
    else:
        what, kept, tail = f"model save to {run}/final", STEPS, ""
        assert _steps(run) == list(range(1, STEPS + 1))
    ours = [line for line in proc.stderr.splitlines() if line.startswith("sftrl sft: error: ")]
    assert ours == [f"sftrl sft: error: {what} failed: [Errno 28] No space left on device{tail}"]
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(os.path.join(run, "final"))
    with ckpt_lib.Checkpointer(os.path.join(run, "checkpoints"), async_save=False) as ck:
        assert ck.latest_step() == kept
    train(cfg)  # space again: the same command resumes from the kept checkpoint
    _same_as_full(run, full)
