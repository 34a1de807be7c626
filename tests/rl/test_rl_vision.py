"""RL on an image env (gp-vl) with a tiny Mllama: the images travel from the env through the rollout
(sampler) into the trainer's forward and the PPO update. The update's token log-probs equal the
sampler's within 1e-5 with the rollout's images, and change when the images are swapped."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sftrl_jax import config, models
from sftrl_jax.data.tokenizer import load_tokenizer
from sftrl_jax.models import config as config_lib
from sftrl_jax.rl.config import RLConfig
from sftrl_jax.rl.train import Trainer
from tests.sampling.helpers import peaked_model

VOCAB = 2048  # the shipped tokenizer's ids; <|image|> is its last one


@pytest.fixture(scope="module")
def mllama_dir(tmp_path_factory):
    tok = load_tokenizer()
    tiny = config_lib.MllamaConfig.tiny(vocab_size=VOCAB - 1, max_position_embeddings=1024)
    cfg = dataclasses.replace(tiny, image_token_index=tok.image_token_id)
    path = str(tmp_path_factory.mktemp("mllama") / "hf")
    models.save_pretrained(peaked_model(cfg, seed=7), path)
    return path


@pytest.mark.slow  # ~70 s of one core, almost all XLA compiles (sampler, value and update steps with the vision tower)
def test_gp_vl_images_reach_the_ppo_update(tmp_path, mllama_dir):
    d = {
        "model": {"init": mllama_dir},
        "env": {"task": "gp-vl", "num_envs": 2},
        "sampling": {"max_new_tokens": 8, "temperature": 1.0},
        "ppo": {"epochs": 1, "samples_per_step": 2, "micro_batch": 2},
        "optim": {"lr": 1.0e-3, "grad_clip": 1.0},
        "eval": {"every": 0, "splits": []},
        "train": {
            "run_dir": str(tmp_path / "run"),
            "updates": 1,
            "steps_per_update": 1,
            "length_buckets": [256, 512],
            "devices": 1,
            "progress": False,
            "async_checkpointing": False,
        },
    }
    (tmp_path / "vl.yaml").write_text(json.dumps(d))
    trainer = Trainer(config.load(RLConfig, tmp_path / "vl.yaml"))
    tok = trainer.harness.tokenizer
    with jax.set_mesh(trainer.harness.mesh):
        _, turns = trainer.learner.collect()
        assert len(turns) == 2
        for t in turns:  # the env's table image rode along with the first turn's context
            assert len(t.images) == 1 and t.images[0].size == (1200, 1200)
            assert t.context_ids.count(tok.image_token_id) == 1 and len(t.logprobs) == len(t.response_ids)

        # Another hand's image in place of each turn's own (same prompt text: gp-vl shows cards only in the image).
        other = []
        for k, t in enumerate(turns):
            trainer.learner.envs[0].reset(seed=10_000 + k)
            other.append(dataclasses.replace(t, images=[trainer.learner.envs[0].render()]))

        def update_batch(ts, values):
            batch = trainer.learner.batcher.build(ts)
            n = len(ts)
            batch.update(
                old_logp=np.array([trainer.learner.sampler_turn_logp(t) for t in turns], np.float32),
                old_values=values.astype(np.float32),
                advantages=np.array([1.0, -1.0], np.float32)[:n],
                returns=np.ones(n, np.float32),
            )
            return batch

        own = trainer.learner.batcher.build(turns)
        swapped = trainer.learner.batcher.build(other)
        assert "pixel_values" in own and own["cross_attention_mask"].sum() > 0
        assert not np.array_equal(own["pixel_values"], swapped["pixel_values"])
        np.testing.assert_array_equal(own["input_ids"], swapped["input_ids"])

        # Trainer forward (values and token log-probs) vs the sampler's log-probs.
        v_own, _, lp_own = trainer.learner.value_fn(trainer.state.params, trainer.learner.batcher.device(own))
        v_swap, _, lp_swap = trainer.learner.value_fn(trainer.state.params, trainer.learner.batcher.device(swapped))
        mask = own["resp_mask"] > 0
        gap_own = np.abs(np.asarray(lp_own) - own["old_token_logp"])[mask].max()
        gap_swap = np.abs(np.asarray(lp_swap) - own["old_token_logp"])[mask].max()
        assert gap_own < 1e-5, gap_own
        assert gap_swap > 1e-3, gap_swap
        assert np.abs(np.asarray(v_own) - np.asarray(v_swap)).max() > 1e-6  # the critic sees the image too

        # The PPO update itself: ratio == 1 with the rollout's images, not with the swapped ones.
        copy = lambda s: jax.tree.map(jnp.copy, s)  # noqa: E731 (update_fn donates its state)
        values = np.asarray(v_own)
        s_own, m_own = trainer.learner.update_fn(
            copy(trainer.state), trainer.learner.batcher.device(update_batch(turns, values))
        )
        s_swap, m_swap = trainer.learner.update_fn(
            copy(trainer.state), trainer.learner.batcher.device(update_batch(other, values))
        )
        assert float(m_own["logprob_gap_max"]) < 1e-5, float(m_own["logprob_gap_max"])
        assert float(m_own["ratio_mean"]) == pytest.approx(1.0, abs=1e-5)
        assert float(m_swap["logprob_gap_max"]) > 1e-3
        # Images reach the vision tower's gradient: the two updates move its weights differently.
        vis = lambda s: np.concatenate(  # noqa: E731
            [
                np.ravel(x)
                for k, x in jax.tree_util.tree_leaves_with_path(s.params)
                if "vision" in jax.tree_util.keystr(k)
            ]
        )
        assert vis(s_own).size > 0 and np.abs(vis(s_own) - vis(s_swap)).max() > 0
    trainer.harness.checkpointer.close()
