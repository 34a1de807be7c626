"""Faults around saving (issue 32): one run per folder (a lock), a failed checkpoint save stops the
run at once with one line and keeps what was saved before, model checkpoints (`final`, snapshots)
land whole or not at all, and a checkpoint that does not restore says whether it is damaged or from
another config."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sftrl_jax import cli
from sftrl_jax.errors import SaveError, UserError
from sftrl_jax.train import checkpoint as ckpt_lib
from sftrl_jax.train import run_lock

STATE = {"a": jnp.arange(1000, dtype=jnp.float32), "b": jnp.ones((4, 4))}
HOST = socket.gethostname()

# A live run holding the folder's lock (what `sftrl sft` does first), in another process.
HOLD = (
    "import sys, time; from sftrl_jax.train import run_lock; run_lock.acquire(sys.argv[1]); "
    "print('held', flush=True); time.sleep(600)"
)


@contextlib.contextmanager
def held_elsewhere(run_dir):
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        yield p
    finally:
        p.kill()
        p.wait()


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ------------------------------------------------------------------------------------------- the lock


def test_a_live_holder_refuses_a_second_run_naming_folder_host_and_pid(tmp_path):
    run = tmp_path / "run"
    with held_elsewhere(run) as holder:
        with pytest.raises(UserError) as e:
            run_lock.acquire(str(run))
        assert str(e.value) == (
            f"run folder {run} is in use by pid {holder.pid} on host {HOST} (lock file {run}/.lock); "
            "wait for that run to end or choose another run folder"
        )
        assert run_lock.holder(str(run)) == {"host": HOST, "pid": holder.pid}
    # the holder is gone (killed: the kernel dropped its lock); the folder is free again
    with run_lock.acquire(str(run)):
        assert run_lock.holder(str(run)) == {"host": HOST, "pid": os.getpid()}
    assert run_lock.holder(str(run)) is None  # released


def test_a_stale_lock_is_taken_over_with_a_line(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    dead = _dead_pid()
    (run / ".lock").write_text(json.dumps({"host": HOST, "pid": dead}))
    logged: list[str] = []
    lock = run_lock.acquire(str(run), log=logged.append)
    assert logged == [
        f"run folder {run}: taking over the stale lock of pid {dead} on this host "
        "(that run ended without releasing it: killed or crashed)"
    ]
    assert run_lock.holder(str(run)) == {"host": HOST, "pid": os.getpid()}
    again = run_lock.acquire(str(run), log=logged.append)  # re-entrant in one process, silently
    again.release()
    assert run_lock.holder(str(run)) is not None  # still held by the first
    lock.release()
    lock.release()  # idempotent
    assert run_lock.holder(str(run)) is None


def test_without_flock_the_file_decides(tmp_path, monkeypatch):
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(run_lock.fcntl, "flock", no_flock)
    run = tmp_path / "run"
    run.mkdir()
    for named in ({"host": HOST, "pid": os.getppid()}, {"host": "other-node", "pid": 1}):
        (run / ".lock").write_text(json.dumps(named))
        with pytest.raises(UserError, match="delete the lock file if that process is gone"):
            run_lock.acquire(str(run))
    (run / ".lock").write_text(json.dumps({"host": HOST, "pid": _dead_pid()}))
    logged: list[str] = []
    with run_lock.acquire(str(run), log=logged.append):
        assert "taking over the stale lock" in logged[0]


# Each process of a 2-process run: only process 0 tries the lock; both learn that it is taken.
TWO_PROCESSES = textwrap.dedent("""
    import sys
    from sftrl_jax.errors import UserError
    from sftrl_jax.parallel import distributed
    from sftrl_jax.train import run_lock
    distributed.maybe_initialize()
    try:
        run_lock.acquire(sys.argv[1])
    except UserError as e:
        print(e)
        sys.exit(2)
    print("locked")
""")


def test_every_process_of_a_multi_process_run_learns_the_folder_is_in_use(tmp_path):
    run = tmp_path / "run"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with held_elsewhere(run) as holder:
        procs = []
        for pid in range(2):
            env = dict(
                os.environ,
                JAX_PLATFORMS="cpu",
                XLA_FLAGS="--xla_force_host_platform_device_count=1",
                SFTRL_COORDINATOR=f"127.0.0.1:{port}",
                SFTRL_NUM_PROCESSES="2",
                SFTRL_PROCESS_ID=str(pid),
            )
            cmd = [sys.executable, "-c", TWO_PROCESSES, str(run)]
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 2, err[-3000:]
        last = out.splitlines()[-1]  # after gloo's own line
        assert last.startswith(f"run folder {run} is in use by pid {holder.pid} on host {HOST} "), out


def _sft_config(tmp_path, run):
    data = tmp_path / "data.json"
    conv = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]
    data.write_text(json.dumps([{"conversations": conv}] * 4))
    cfg = {
        "model": {"preset": "llama-tiny"},
        "data": {"train_files": [str(data)], "max_length": 64, "buckets": [64], "batch_size": 4},
        "train": {"run_dir": str(run), "steps": 2, "progress": False},
    }
    path = tmp_path / "sft.yaml"
    path.write_text(json.dumps(cfg))
    return path


def test_sftrl_sft_rl_and_study_on_a_folder_in_use_exit_2_with_one_line_writing_nothing(tmp_path, capsys):
    from tests.rl.test_rl_train import make

    run = tmp_path / "run"
    sft_config = _sft_config(tmp_path, run)
    make(tmp_path, "run")  # writes run.yaml, an RL config for the same folder
    commands = {
        "sft": ["sft", "--config", str(sft_config)],
        "rl": ["rl", "--config", str(tmp_path / "run.yaml")],
        "study": ["study", f"run_dir={run}", f"base={tmp_path / 'no_base_needed'}"],
    }
    run.mkdir()
    rows = '{"step": 1, "train/loss": 2.0}\n{"step": 2, "train/loss": 1.5}\n'
    (run / "metrics.jsonl").write_text(rows)  # the live run's metrics so far
    with held_elsewhere(run) as holder:
        before = sorted(os.listdir(run))
        for name, argv in commands.items():
            assert cli.main(argv) == 2, name
            err = capsys.readouterr().err
            assert err == (
                f"sftrl {name}: error: run folder {run} is in use by pid {holder.pid} on host {HOST} (lock file "
                f"{run}/.lock); wait for that run to end or choose another run folder\n"
            )
            assert sorted(os.listdir(run)) == before  # no config.yaml, no checkpoints
            assert (run / "metrics.jsonl").read_text() == rows  # not rewound, not appended to


# ---------------------------------------------------------------------------------- failed checkpoint saves


def _fail_json_writes(monkeypatch):
    """Every JSON item orbax writes from now on fails as on a full disk (in its background thread)."""
    from orbax.checkpoint._src.handlers import json_checkpoint_handler as J

    async def full_disk(self, x, directory):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(J.JsonCheckpointHandler, "_save_fn", full_disk)


def test_a_failed_background_save_stops_at_the_next_check_and_keeps_the_previous(tmp_path, monkeypatch):
    directory = str(tmp_path / "checkpoints")
    ck = ckpt_lib.Checkpointer(directory, keep=1, async_save=True)
    ck.save(1, STATE, {"k": 1})
    ck.wait()
    _fail_json_writes(monkeypatch)
    assert ck.save(2, STATE, {"k": 2})  # returns at once; the write fails in the background
    deadline = time.monotonic() + 60
    with pytest.raises(SaveError) as e:
        while time.monotonic() < deadline:  # what the loop does after every step
            ck.check()
            time.sleep(0.01)
    assert str(e.value) == (
        f"checkpoint save to {directory}/2 failed: [Errno 28] No space left on device (the checkpoints "
        "before it are kept; the same command resumes from the latest)"
    )
    with pytest.raises(SaveError):  # and again: the run cannot save past it
        ck.save(3, STATE, {"k": 3})
    t0 = time.monotonic()
    ck.close()  # returns at once, waits for nothing
    assert time.monotonic() - t0 < 1
    monkeypatch.undo()
    with ckpt_lib.Checkpointer(directory, async_save=False) as again:
        assert again.all_steps() == [1]  # keep=1, and step 1 was not rotated out by the failed step 2
        assert again.restore(1, STATE)[1] == {"k": 1}


# The hard case: the step's folder cannot be made (mkdir on a full disk). Orbax's writer threads then
# wait ~5 minutes for a "folder made" signal that never comes, and Python waits for them at exit.
STUCK = textwrap.dedent("""
    import errno, os, sys
    import jax.numpy as jnp
    from orbax.checkpoint._src.path import atomicity
    from sftrl_jax import cli
    from sftrl_jax.errors import SaveError
    from sftrl_jax.train import checkpoint
    create = atomicity._create_paths
    async def full_disk(tmp_paths, *a, **k):
        if any("/2." in str(p.get()) for p in tmp_paths):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return await create(tmp_paths, *a, **k)
    atomicity._create_paths = full_disk
    ck = checkpoint.Checkpointer(sys.argv[1], async_save=True)
    state = {"a": jnp.ones(10)}
    ck.save(1, state, {}); ck.wait()
    ck.save(2, state, {})
    try:
        ck.close()
    except SaveError as e:
        print(f"error: {e}", file=sys.stderr)
        cli.exit_without_stuck_threads(2, grace_s=1.0)
    sys.exit(3)
""")


def test_stuck_writer_threads_do_not_hold_the_process(tmp_path):
    directory = tmp_path / "checkpoints"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", STUCK, str(directory)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert time.monotonic() - t0 < 60  # not orbax's 300 s wait
    ours = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert ours == [
        f"error: checkpoint save to {directory}/2 failed: [Errno 28] No space left on device (the checkpoints "
        "before it are kept; the same command resumes from the latest)"
    ]
    assert "Traceback" not in proc.stderr  # orbax's error records are one line each
    assert sorted(p for p in os.listdir(directory) if not p.startswith(".")) == ["1"]


# ------------------------------------------------------------------------------------ model checkpoints


def _tiny(seed=0):
    from sftrl_jax.train.state import ModelSection, load_model

    over = dict(vocab_size=256, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1)
    return load_model(ModelSection(preset="llama-tiny", text_overrides={**over, "head_dim": 8}), seed=seed)


@pytest.fixture(scope="module")
def tiny_model():
    return _tiny()


def _params(path):
    from flax import nnx

    from sftrl_jax.models.checkpoint import load_checkpoint

    state = nnx.state(load_checkpoint(str(path)), nnx.Param)
    return [np.asarray(x) for x in jax.tree.leaves(state)]


def test_a_model_save_replaces_atomically_and_clears_leftovers(tmp_path, tiny_model):
    from flax import nnx

    from sftrl_jax.models.checkpoint import is_checkpoint, save_checkpoint

    path = tmp_path / "final"
    (tmp_path / "final.partial" / "params").mkdir(parents=True)  # what a killed save left
    (tmp_path / "final.old").mkdir()
    path.mkdir()  # an incomplete `final` of the older, non-atomic layout (no model_config.json)
    assert not is_checkpoint(str(path))
    save_checkpoint(tiny_model, str(path))
    assert is_checkpoint(str(path)) and sorted(os.listdir(tmp_path)) == ["final"]
    other = _tiny(seed=1)
    save_checkpoint(other, str(path))  # replaces the complete one
    assert sorted(os.listdir(tmp_path)) == ["final"]
    want = [np.asarray(x) for x in jax.tree.leaves(nnx.state(other, nnx.Param))]
    for a, b in zip(want, _params(path), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_model_save_never_replaces_a_folder_of_other_files(tmp_path, tiny_model):
    from sftrl_jax.models.checkpoint import save_checkpoint

    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    with pytest.raises(UserError, match=r"hf holds files that are not a model checkpoint's \(config.json\)"):
        save_checkpoint(tiny_model, str(tmp_path / "hf"))
    assert os.listdir(tmp_path / "hf") == ["config.json"]


def test_a_failed_model_save_leaves_the_old_model(tmp_path, tiny_model, monkeypatch):
    from sftrl_jax.models import checkpoint as model_ckpt

    path = tmp_path / "final"
    model_ckpt.save_checkpoint(tiny_model, str(path))
    before = _params(path)

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(model_ckpt, "json", types.SimpleNamespace(dump=full_disk))  # model_config.json
    with pytest.raises(SaveError) as e:
        model_ckpt.save_checkpoint(tiny_model, str(path))
    assert str(e.value) == f"model save to {path} failed: [Errno 28] No space left on device"
    monkeypatch.undo()
    for a, b in zip(before, _params(path)):
        np.testing.assert_array_equal(a, b)


KILL_IN_MODEL_SAVE = textwrap.dedent("""
    import os, signal, sys
    from sftrl_jax.models import checkpoint
    from sftrl_jax.train.state import ModelSection, load_model
    over = dict(vocab_size=256, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1)
    model = load_model(ModelSection(preset="llama-tiny", text_overrides={**over, "head_dim": 8}), seed=0)
    rename = os.rename
    def killed(src, dst):
        if dst == sys.argv[1]:
            os.kill(os.getpid(), signal.SIGKILL)  # all written, not yet renamed into place
        return rename(src, dst)
    checkpoint.os.rename = killed
    checkpoint.save_checkpoint(model, sys.argv[1])
""")


def test_a_model_save_killed_before_its_rename_leaves_no_model(tmp_path, tiny_model):
    from sftrl_jax.models.checkpoint import read_checkpoint_config

    path = str(tmp_path / "final")
    proc = subprocess.run([sys.executable, "-c", KILL_IN_MODEL_SAVE, path], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert sorted(os.listdir(tmp_path)) == ["final.partial"]
    with pytest.raises(UserError) as e:
        read_checkpoint_config(path)
    assert str(e.value) == (
        f"{path}: not a sftrl_jax model checkpoint (no model_config.json) (an unfinished save is in "
        f"{path}.partial: rerun what writes it)"
    )


# ------------------------------------------------------------------------------- what a restore says


def _saved(tmp_path) -> str:
    directory = str(tmp_path / "checkpoints")
    with ckpt_lib.Checkpointer(directory, async_save=False) as ck:
        ck.save(1, STATE, {"k": 1})
    return directory


def _restore_error(directory, target) -> str:
    with ckpt_lib.Checkpointer(directory, async_save=False) as ck:
        with pytest.raises(UserError) as e:
            ck.restore(1, target)
    return str(e.value)


def test_a_truncated_checkpoint_is_called_damaged_not_another_config(tmp_path):
    from tests.train.test_resume_faults import _truncate_arrays

    directory = _saved(tmp_path)
    _truncate_arrays(directory, 1)
    msg = _restore_error(directory, STATE)
    assert msg.startswith(f"checkpoint {directory}/1 is damaged (truncated or corrupted files?): ")
    assert "config" not in msg and "\n" not in msg and len(msg) < 500


def test_another_config_is_called_a_mismatch_naming_what_differs(tmp_path):
    directory = _saved(tmp_path)
    head = f"checkpoint {directory}/1 does not match this run's state (a different model or optimiser config?): "
    other_keys = {"a": STATE["a"], "c": STATE["b"]}
    assert _restore_error(directory, other_keys) == head + "1 only in the checkpoint: b; 1 only in this run's state: c"
    other_shape = {"a": jnp.zeros(999), "b": STATE["b"]}
    msg = _restore_error(directory, other_shape)
    assert msg.startswith(head + "Requested shape: (999,) is not compatible with the stored shape: (1000,)")
    assert "\n" not in msg
