"""Resume after faults (issue 23 items 5, 6): a checkpoint that does not restore is skipped for the
newest one that does, said so and kept (moved aside, never deleted); metrics files are rewound to the
checkpoint so that each step appears once."""

from __future__ import annotations

import glob
import json
import os

import jax
import jax.numpy as jnp
import pytest

from sftrl_jax.errors import UserError
from sftrl_jax.train import checkpoint as ckpt_lib
from sftrl_jax.train import metrics as metrics_lib

STATE = {"a": jnp.arange(1000, dtype=jnp.float32), "b": jnp.ones((4, 4))}


def _saved(tmp_path, steps=(1, 2, 3)) -> str:
    directory = str(tmp_path / "checkpoints")
    with ckpt_lib.Checkpointer(directory, keep=5, async_save=False) as ck:
        for s in steps:
            ck.save(s, jax.tree.map(lambda x, s=s: x * s, STATE), {"k": s})
    return directory


def _truncate_arrays(directory: str, step: int) -> None:
    """Cuts every array data file of `step` in half (a partial copy, a full disk)."""
    files = glob.glob(os.path.join(directory, str(step), "state", "**", "d", "*"), recursive=True)
    assert files
    for p in files:
        with open(p, "r+b") as f:
            f.truncate(os.path.getsize(p) // 2)


CORRUPTIONS = {
    "truncated_arrays": _truncate_arrays,
    "truncated_extra": lambda d, s: open(os.path.join(d, str(s), "extra", "metadata"), "w").write('{"k'),
    "no_state_item": lambda d, s: __import__("shutil").rmtree(os.path.join(d, str(s), "state")),
}


@pytest.mark.parametrize("corrupt", list(CORRUPTIONS))
def test_corrupted_latest_falls_back_and_is_kept(tmp_path, corrupt):
    directory = _saved(tmp_path)
    CORRUPTIONS[corrupt](directory, 3)
    logged: list[str] = []
    with ckpt_lib.Checkpointer(directory, keep=5, async_save=False) as ck:
        assert ck.latest_step() == 3
        step, state, extra = ck.restore_latest(STATE, log=logged.append)
        assert step == 2 and extra == {"k": 2} and float(state["a"][1]) == 2.0
        assert ck.all_steps() == [1, 2]
        ck.save(3, jax.tree.map(lambda x: x * 30, STATE), {"k": 30})  # the step can be saved again
        assert ck.restore(3, STATE)[1] == {"k": 30}
    assert len(logged) == 2, logged
    assert logged[0].startswith(f"checkpoint: skipping step 3 of {directory}: it does not restore (")
    assert "\n" not in logged[0]
    kept = directory + ".skipped/3"
    assert logged[1] == f"checkpoint: moved the skipped step 3 to {kept} (kept, not deleted)"
    assert os.path.isdir(os.path.join(kept, "extra"))  # what was there, untouched


def test_two_bad_checkpoints_and_a_repeat(tmp_path):
    directory = _saved(tmp_path, steps=(1, 2, 3))
    _truncate_arrays(directory, 3)
    _truncate_arrays(directory, 2)
    logged: list[str] = []
    with ckpt_lib.Checkpointer(directory, keep=5, async_save=False) as ck:
        assert ck.restore_latest(STATE, log=logged.append)[0] == 1
        ck.save(2, STATE, {})
        ck.save(3, STATE, {})
    assert [line.split(" of ")[0] for line in logged[:2]] == [
        "checkpoint: skipping step 3",
        "checkpoint: skipping step 2",
    ]
    assert sorted(os.listdir(directory + ".skipped")) == ["2", "3"]
    _truncate_arrays(directory, 3)  # broken again: kept beside the first one
    with ckpt_lib.Checkpointer(directory, keep=5, async_save=False) as ck:
        assert ck.restore_latest(STATE, log=logged.append)[0] == 2
    assert sorted(os.listdir(directory + ".skipped")) == ["2", "3", "3.1"]


def test_no_checkpoint_restores_names_each_and_moves_nothing(tmp_path):
    directory = _saved(tmp_path, steps=(1, 2))
    _truncate_arrays(directory, 1)
    _truncate_arrays(directory, 2)
    with ckpt_lib.Checkpointer(directory, keep=5, async_save=False) as ck:
        with pytest.raises(UserError) as e:
            ck.restore_latest(STATE, log=lambda line: None)
    msg = str(e.value)
    assert "\n" not in msg and f"no checkpoint in {directory} restores (step 2: " in msg and "; step 1: " in msg
    assert "nothing was deleted" in msg
    assert sorted(os.listdir(directory)) == ["1", "2"] and not os.path.exists(directory + ".skipped")


def test_fresh_directory(tmp_path):
    with ckpt_lib.Checkpointer(str(tmp_path / "c"), async_save=False) as ck:
        assert ck.restore_latest(STATE) == (None, None, None)


# ------------------------------------------------------------------------------------------------ rewind


def _rows(path):
    return [json.loads(line) for line in open(path).read().splitlines()]


def test_rewind_drops_steps_after_the_checkpoint_and_keeps_them_aside(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with metrics_lib.MetricsWriter(tmp_path) as w:
        for step in range(1, 7):
            w.write(step, {"loss": float(step)}, prefix="train")
        w.write(4, {"loss": 0.5}, prefix="eval")
    with open(path, "a") as f:
        f.write('{"step": 7, "train/lo')  # the line a SIGKILL cut
    assert metrics_lib.rewind(path, checkpoint_step=4) == 3
    assert [(r["step"], next(k for k in r if "/" in k)) for r in _rows(path)] == [
        (1, "train/loss"), (2, "train/loss"), (3, "train/loss"), (4, "train/loss"), (4, "eval/loss")
    ]  # fmt: skip
    aside = open(tmp_path / "metrics.rewound.jsonl").read().splitlines()
    assert [json.loads(line)["step"] for line in aside[:2]] == [5, 6] and aside[2] == '{"step": 7, "train/lo'
    with metrics_lib.MetricsWriter(tmp_path) as w:  # the resumed run appends after the checkpoint
        w.write(5, {"loss": 5.0}, prefix="train")
    assert [r["step"] for r in metrics_lib.read_jsonl(path)] == [1, 2, 3, 4, 4, 5]


def test_rewind_of_a_fresh_start_and_of_nothing(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert metrics_lib.rewind(path, checkpoint_step=3) == 0 and not path.exists()
    path.write_text('{"step": 1}\n{"step": 2}\n')
    assert metrics_lib.rewind(path, checkpoint_step=2) == 0
    assert metrics_lib.rewind(path, checkpoint_step=None) == 2  # no checkpoint: the run starts over
    assert path.read_text() == "" and len(open(tmp_path / "metrics.rewound.jsonl").readlines()) == 2
