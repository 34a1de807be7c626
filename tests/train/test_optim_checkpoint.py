"""Optimiser (schedule, masks, freezing, non-finite skipping), checkpoints and metrics files."""

import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sftrl_jax.config import ConfigError
from sftrl_jax.train import checkpoint, metrics, optim


class Toy(nnx.Module):
    def __init__(self, rngs):
        self.vision = nnx.Linear(3, 3, rngs=rngs)
        self.text = nnx.Linear(3, 2, rngs=rngs)
        self.norm = nnx.RMSNorm(2, rngs=rngs)

    def __call__(self, x):
        return self.norm(self.text(self.vision(x)))


def _params():
    return nnx.state(Toy(nnx.Rngs(0)), nnx.Param)


def test_schedule_warmup_then_cosine():
    cfg = optim.OptimConfig(lr=1.0, warmup_ratio=0.1, min_lr=0.1)
    lr = optim.schedule(cfg, 100)
    assert float(lr(0)) == 0.0
    assert float(lr(5)) == pytest.approx(0.5)
    assert float(lr(10)) == pytest.approx(1.0)
    assert float(lr(55)) == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-5)  # cosine half-way
    assert float(lr(100)) == pytest.approx(0.1)


def test_freeze_and_decay_masks():
    params = _params()
    cfg = optim.OptimConfig(
        lr=0.1, warmup_ratio=0.0, schedule="constant", weight_decay=0.5, freeze=(r"^vision/",), grad_clip=None
    )
    tx = optim.make_optimizer(cfg, params, total_steps=10)
    state = tx.init(params)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, state, params)
    flat = {optim.path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(updates)}
    # frozen: no update at all; decayed kernel: -lr*wd*w with zero grads; norm scale: no decay.
    assert all(np.all(v == 0) for k, v in flat.items() if k.startswith("vision/"))
    w = np.asarray(params["text"]["kernel"][...])
    np.testing.assert_allclose(
        flat["text/kernel/value"] if "text/kernel/value" in flat else flat["text/kernel"], -0.1 * 0.5 * w, rtol=1e-6
    )
    assert all(np.all(v == 0) for k, v in flat.items() if k.startswith("norm/") or k.startswith("text/bias"))


def test_bad_freeze_patterns():
    with pytest.raises(ConfigError, match=r"matches no parameter path"):
        optim.make_optimizer(optim.OptimConfig(freeze=("nothing_here",)), _params(), total_steps=1)
    with pytest.raises(ConfigError, match="bad regular expression"):
        optim.OptimConfig(freeze=("(",))


def test_nonfinite_gradients_are_skipped_and_counted():
    params = _params()
    tx = optim.make_optimizer(optim.OptimConfig(lr=0.1, warmup_ratio=0.0), params, total_steps=10)
    state = tx.init(params)
    bad = jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), params)
    updates, state = tx.update(bad, state, params)
    assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
    consecutive, total = optim.nonfinite_counts(state)
    assert int(consecutive) == 1 and int(total) == 1


def test_checkpoint_round_trip_into_shardings(tmp_path):
    mesh = jax.make_mesh((jax.device_count(),), ("fsdp",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
    state = {
        "w": jax.device_put(jnp.arange(16.0), sharding),
        "step": jnp.int32(7),
        "rng": jax.random.key_data(jax.random.key(3)),
    }
    with checkpoint.Checkpointer(tmp_path / "ckpt", keep=2) as ck:
        for step in (1, 2, 3):
            ck.save(step, {**state, "w": state["w"] + step}, {"data": step})
        ck.wait()
        assert ck.all_steps() == [2, 3]
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    ck = checkpoint.Checkpointer(tmp_path / "ckpt")
    step, restored, extra = ck.restore_latest(abstract)
    assert step == 3 and extra == {"data": 3}
    np.testing.assert_array_equal(restored["w"], np.arange(16.0) + 3)
    assert restored["w"].sharding == sharding
    np.testing.assert_array_equal(restored["rng"], state["rng"])
    from sftrl_jax.errors import UserError

    with pytest.raises(UserError, match="no checkpoint for step 9"):
        ck.restore(9, abstract)
    ck.close()
    empty = checkpoint.Checkpointer(tmp_path / "fresh")
    assert empty.restore_latest(abstract) == (None, None, None)
    empty.close()


def test_preemption_guard_turns_sigterm_into_a_flag():
    with checkpoint.PreemptionGuard() as guard:
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.requested
    assert signal.getsignal(signal.SIGTERM) is not guard._handle


def test_metrics_jsonl(tmp_path):
    with metrics.MetricsWriter(tmp_path) as log:
        log.write(1, {"loss": np.float32(0.5), "bad": float("nan")}, prefix="train")
        log.write(2, {"loss": jnp.array(0.25)}, prefix="train")
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "trunc')  # a run killed mid-write
    rows = metrics.read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["train/loss"] == 0.5 and rows[0]["train/bad"] == "nan"
    assert rows[1]["train/loss"] == 0.25
    json.dumps(rows)
