"""`model.scan_layers`: the layer stacks stored stacked and run as one scan give the unrolled model's
logits and gradients (fp32, 1e-5), with and without remat, text-only and with images; the sharded
8-device step too. The stacked model holds the per-layer model's weights (`stacking.relayout`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sftrl_jax.models import build, layers, stacking
from sftrl_jax.models import config as config_lib
from tests.models import hf_helpers as H

TOL = 1e-5


def _close(a, b) -> bool:
    """max |a - b| within TOL of max |b| (exactly equal where b is all zeros: unused layers)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b))) <= TOL * float(np.max(np.abs(b)))


def _loss_and_grads(model, inputs):
    graphdef, state = nnx.split(model)
    ids = inputs["input_ids"]

    @jax.jit
    def run(state):
        def loss(state):
            logits = nnx.merge(graphdef, state)(**inputs).logits
            logp = jax.nn.log_softmax(logits)
            targets = ids[:, 1:, None] % logits.shape[-1]  # the image token is no vocabulary entry
            return -jnp.mean(jnp.take_along_axis(logp[:, :-1], targets, -1)), logits

        return jax.value_and_grad(loss, has_aux=True)(state)

    (loss, logits), grads = run(state)
    return loss, logits, grads


def stacked_twin(model, cfg, **kw):
    """`model` (per layer) as a model built with `scan_layers`, holding the same weights."""
    graphdef, target = nnx.split(build.abstract_model(cfg, scan_layers=True, **kw))
    return nnx.merge(graphdef, stacking.relayout(nnx.state(model), target))


def _compare(cfg, inputs, remat):
    model = build.create_model(cfg, seed=3, remat=remat)
    runs = [_loss_and_grads(m, inputs) for m in (model, stacked_twin(model, cfg, remat=remat))]
    (l0, z0, g0), (l1, z1, g1) = runs
    g1 = stacking.relayout(g1, g0)  # the stacked gradients, one per layer
    assert _close(z1, z0)
    assert abs(float(l1 - l0)) < TOL * abs(float(l0))
    flat0, flat1 = build.flat_params(g0), build.flat_params(g1)
    assert flat0.keys() == flat1.keys()
    bad = [k for k in flat0 if not _close(flat1[k][...], flat0[k][...])]
    assert not bad
    # Every layer's gradient is its own (a stacking mistake would give two layers the same one).
    keys = [k for k in flat0 if k.endswith("mlp.down_proj")]
    assert len(keys) >= 2 and not np.allclose(flat1[keys[0]][...], flat1[keys[1]][...])


@pytest.mark.parametrize("remat", [False, True])
def test_scanned_llama_equals_unrolled(remat):
    cfg = config_lib.LlamaConfig.tiny(num_layers=3)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 10)))
    mask = jnp.ones((2, 10), jnp.int32).at[1, :3].set(0)
    _compare(cfg, {"input_ids": ids, "attention_mask": mask}, remat)


@pytest.mark.parametrize(
    ("images", "remat"),
    [
        (False, False),
        (False, True),
        pytest.param(True, False, marks=pytest.mark.slow),
        pytest.param(True, True, marks=pytest.mark.slow),  # 22 s cold
    ],
)
def test_scanned_mllama_equals_unrolled(images, remat):
    cfg = config_lib.MllamaConfig.tiny()
    batch = {k: jnp.asarray(v) for k, v in H.image_batch(cfg, seed=1).items()}
    if not images:
        batch = {k: batch[k] for k in ("input_ids", "attention_mask")}
    _compare(cfg, batch, remat)


def test_period_finds_the_repeating_group():
    cross = [i in (3, 8, 13, 18, 23, 28, 33, 38) for i in range(40)]  # Llama 3.2 11B Vision
    assert layers.period(cross) == 5
    assert layers.period([False] * 32) == 1
    assert layers.period([False, True, False, True]) == 2
    assert layers.period([False, True, True]) == 3  # no repeat: one group of everything


def test_scan_refuses_layers_of_different_structure():
    cfg = config_lib.MllamaConfig.tiny()
    model = build.create_model(cfg, seed=0)
    lm = model.language_model
    with pytest.raises(ValueError, match="differ in structure"):
        layers.stack([lm.layers[0], lm.layers[1]])


@pytest.mark.slow  # 28 s cold; scan = unrolled stays in the default suite on one device
def test_scanned_step_on_eight_devices_equals_unrolled():
    """The sharded (fsdp=8) SFT step with micro-batches: the same loss and updated parameters."""
    from sftrl_jax.parallel import mesh as mesh_lib
    from sftrl_jax.sft.train import make_train_step
    from sftrl_jax.train import optim
    from sftrl_jax.train.state import TrainState, rng_data, split_params

    mesh = mesh_lib.make_mesh(mesh_lib.parse_mesh_spec("data=1,fsdp=-1,tensor=1"))
    ids = np.random.default_rng(5).integers(0, 256, (8, 16))
    batch = {
        "input_ids": jnp.asarray(ids, jnp.int32),
        "attention_mask": jnp.ones(ids.shape, jnp.int32),
        "targets": jnp.asarray(np.roll(ids, -1, 1), jnp.int32),
        "loss_mask": jnp.ones(ids.shape, jnp.float32),
    }
    cfg = optim.OptimConfig(lr=1e-3, warmup_ratio=0.0, schedule="constant")
    results = []
    cfg3 = config_lib.LlamaConfig.tiny(num_layers=3)
    for scan in (False, True):
        model = build.create_model(cfg3, mesh=mesh, seed=2, remat=True)
        if scan:
            graphdef, target = nnx.split(build.abstract_model(cfg3, remat=True, scan_layers=True))
            model = nnx.merge(graphdef, stacking.relayout(nnx.state(model), target, mesh=mesh))
        graphdef, params, rest = split_params(model)
        tx = optim.make_optimizer(cfg, params, total_steps=10)
        state = TrainState(
            step=jnp.int32(0), params=params, opt_state=optim.init_state(tx, params, mesh), rng=rng_data(0)
        )
        step = jax.jit(make_train_step(graphdef, rest, tx, grad_accum=2, lr_fn=optim.schedule(cfg, 10)))
        metrics = []
        with jax.set_mesh(mesh):
            for _ in range(2):  # the second step's loss sees the first update
                state, m = step(state, batch)
                metrics += [float(m["loss"]), float(m["grad_norm"])]
        results.append((np.array(metrics), state.params))
    (m0, p0), (m1, p1) = results
    p0, p1 = build.flat_params(p0), build.flat_params(stacking.relayout(p1, p0))
    assert np.all(np.abs(m1 - m0) <= TOL * np.abs(m0)), (m0, m1)
    assert m1[2] < m1[0]  # it trains
    assert all(p1[k][...].sharding.is_equivalent_to(p0[k][...].sharding, p0[k][...].ndim) for k in p0)
