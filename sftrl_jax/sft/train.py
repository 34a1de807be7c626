"""Supervised fine-tuning: the pure sharded train step and the resumable loop.

    sftrl sft --config configs/sft/gp_l_tiny.yaml train.steps=50

`train_step(state, batch) -> (state, metrics)` is jitted once per padded length bucket, with the
state donated and sharded by the logical-axis rules; gradient accumulation scans over micro-batches
inside the step (one optimiser update per call). `programs` gives the run's jitted programs, the
same ones `sftrl plan` compiles. The run is the one harness (`train.run.Run`: lock, mesh, model,
optimiser, checkpoints, resume, SIGTERM, non-finite steps, snapshots, `final`); `SFTJob` is the
SFT part: data batches, the step, the logged rows, the eval loss. A resumed run continues the data
iterator where the checkpoint left it; `train.max_bad_steps` non-finite steps in a row abort.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sftrl_jax import config as config_lib
from sftrl_jax import ops
from sftrl_jax.config import ConfigError
from sftrl_jax.data.sft import SFTData, SFTDataConfig
from sftrl_jax.evaluation.compute import ComputeCounter
from sftrl_jax.models import logprobs
from sftrl_jax.models.lora import LoRASection
from sftrl_jax.parallel.placement import global_batch
from sftrl_jax.sft.losses import sft_loss_from_logp
from sftrl_jax.train import accumulate as accum_lib
from sftrl_jax.train import metrics as metrics_lib
from sftrl_jax.train import optim as optim_lib
from sftrl_jax.train.run import Run, RunSection
from sftrl_jax.train.state import ModelSection, TrainState

BATCH_KEYS = ("input_ids", "attention_mask", "targets", "loss_mask", *logprobs.IMAGE_KEYS)


@dataclasses.dataclass(frozen=True)
class TrainSection(RunSection):
    """`train:` of an SFT run: the harness's keys (`train.run.RunSection`) and the loop's."""

    run_dir: str = "runs/sft"
    steps: int = 100  # optimiser steps
    grad_accum: int = 1  # micro-batches per optimiser step (data.batch_size is the whole step's batch)
    log_every: int = 10
    eval_every: int = 0  # 0 = no periodic eval loss
    max_bad_steps: int = 5  # abort after this many non-finite steps in a row

    def __post_init__(self):
        for name in ("steps", "grad_accum", "log_every", "save_every", "keep", "max_bad_steps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"train.{name} must be positive, got {getattr(self, name)}")
        super().__post_init__()
        config_lib.check_ranges(self, eval_every="[0, inf)")


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    model: ModelSection
    data: SFTDataConfig
    optim: optim_lib.OptimConfig = dataclasses.field(default_factory=optim_lib.OptimConfig)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    lora: LoRASection = dataclasses.field(default_factory=LoRASection)  # rank 0: full fine-tuning


# ----------------------------------------------------------------------------------------------
# The step


def make_train_step(graphdef, rest, tx: optax.GradientTransformation, *, grad_accum: int, lr_fn, policy=None):
    """The pure SFT step over (TrainState, batch); `rest` = the model's non-trainable variables.
    `policy`: the `ops.Policy` the step is traced under (None = the platform default; the loop
    passes `ops.policy_for(mesh)`, which enables the native CPU kernels on one CPU device)."""

    def loss_fn(params, mb):
        model = nnx.merge(graphdef, params, rest)
        out = logprobs.forward(model, mb, argmax=True)
        _, aux = sft_loss_from_logp(out["logp"], out["argmax"], mb["targets"], mb["loss_mask"])
        return aux["nll_sum"], aux

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        # Micro-batch gradients summed, then divided by the step's total loss tokens, so the update
        # equals one big batch's.
        key = accum_lib.step_key(state)
        grads, aux = accum_lib.accumulate(loss_fn, state.params, batch, n_micro=grad_accum, key=key)
        nll, tokens, correct = (aux[k].sum() for k in ("nll_sum", "tokens", "correct"))
        denom = jnp.maximum(tokens, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        new_state, update_metrics = accum_lib.apply(state, grads, tx, lr_fn=lr_fn)
        metrics = {"loss": nll / denom, "token_accuracy": correct / denom, "loss_tokens": tokens, **update_metrics}
        return new_state, metrics

    return ops.traced_with(train_step, policy)


def make_eval_step(graphdef, rest, *, policy=None):
    def eval_step(params, batch):
        model = nnx.merge(graphdef, params, rest)
        out = logprobs.forward(model, batch, argmax=True)
        _, aux = sft_loss_from_logp(out["logp"], out["argmax"], batch["targets"], batch["loss_mask"])
        return aux["nll_sum"], aux["tokens"]

    return ops.traced_with(eval_step, policy)


# ----------------------------------------------------------------------------------------------
# The loop


def programs(run, cfg: SFTConfig) -> dict[str, Any]:
    """The SFT run's jitted programs over `run` (`train.run.Run`, or `train.run.AbstractRun` for
    `sftrl plan`): "train_step" (state donated, sharded like the run's state) and "eval_step"."""
    step = make_train_step(run.graphdef, run.rest, run.tx, grad_accum=cfg.train.grad_accum, lr_fn=run.lr_fn)
    return {
        "train_step": run.compile(step, donate_argnums=0, out_shardings=(run.state_shardings, None)),
        "eval_step": run.compile(make_eval_step(run.graphdef, run.rest)),
    }


def train(cfg: SFTConfig, *, stop_after: int | None = None) -> dict[str, Any]:
    """Runs (or resumes) the SFT run of `cfg`; returns the last logged metrics.

    `stop_after` ends the loop after that many steps *of this call* without finishing the run
    (tests use it to interrupt a run and resume it).
    """
    t = cfg.train
    run = Run(cfg, name="sft", optim=cfg.optim, total_steps=t.steps, check_mesh=lambda mesh: _check_batch(cfg, mesh))
    try:
        job = SFTJob(run, cfg)
    except BaseException:
        run.close()
        raise
    return run.loop(job, total=t.steps, max_bad=t.max_bad_steps, final=run.module, stop_after=stop_after)


def _check_batch(cfg: SFTConfig, mesh) -> None:
    batch_axes = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.data.batch_size % (cfg.train.grad_accum * batch_axes):
        raise ConfigError(
            f"data.batch_size {cfg.data.batch_size} must be divisible by train.grad_accum ({cfg.train.grad_accum}) x "
            f"the batch-sharding mesh axes data*fsdp ({batch_axes})"
        )


class SFTJob:
    """The SFT steps the harness (`train.run.Run`) loops over: a data batch, the jitted step, the
    logged row every `train.log_every` steps, the eval loss every `train.eval_every` and at the end."""

    unit = "step"

    def __init__(self, run: Run, cfg: SFTConfig):
        self.run, self.cfg = run, cfg
        self.data = SFTData(cfg.data, run.tokenizer, image_processor=run.image_processor)
        self.iterator = self.data.iterator()
        self.compute = ComputeCounter(n_params=run.n_params, d_init=cfg.train.d_init)
        if run.resumed is not None:
            self.iterator.set_state(run.extra["data"])
            self.compute = ComputeCounter.from_state(run.extra["compute"])
        fns = programs(run, cfg)
        self.step_fn, self.eval_fn = fns["train_step"], fns["eval_step"]
        self.peak = metrics_lib.peak_flops()
        self.tokens, self.padded, self.t0 = 0, 0, time.perf_counter()  # since the last logged row

    def begin(self) -> None:
        self.t0 = time.perf_counter()

    def step(self, i: int) -> tuple[dict[str, float] | None, bool]:
        run, t = self.run, self.cfg.train
        local = next(self.iterator)
        batch = global_batch({k: local[k] for k in BATCH_KEYS if k in local}, run.mesh, pad_id=run.tokenizer.pad_id)
        run.state, m = self.step_fn(run.state, batch)
        n_tokens = int(local["attention_mask"].sum()) * jax.process_count()
        self.tokens += n_tokens
        self.padded += local["attention_mask"].size * jax.process_count()
        images = local["pixel_values"].shape[0] * local["pixel_values"].shape[1] if "pixel_values" in local else 0
        self.compute.add_train(n_tokens, n_images=int(images))
        finite = bool(m["finite"])
        done = i + 1
        if done % t.log_every and done != t.steps:
            return None, finite
        tps = self.tokens / max(time.perf_counter() - self.t0, 1e-9)
        row = {k: float(v) for k, v in m.items()}
        row.update(
            tokens_per_s=tps,
            padding_fraction=1.0 - self.tokens / max(self.padded, 1),
            mfu=6.0 * self.compute.n_params * tps / self.peak if self.peak else float("nan"),
            skipped_nonfinite=_skipped(run.state.opt_state),
            gflops=self.compute.flops(rl=False) / 1e9,
            truncated=int(local["truncated"].sum()),
        )
        self.tokens, self.padded, self.t0 = 0, 0, time.perf_counter()
        return row, finite

    def postfix(self, row: dict[str, float]) -> dict[str, str]:
        return {"loss": f"{row['loss']:.4f}", "tok_s": f"{row['tokens_per_s']:.0f}"}

    def after(self, done: int) -> None:
        if self.cfg.train.eval_every and done % self.cfg.train.eval_every == 0:
            self.run.writer.write(done, self.eval_loss(), prefix="eval")

    def eval_loss(self) -> dict[str, float]:
        return evaluate_loss(self.eval_fn, self.run.state.params, self.data, self.run.mesh)

    def extra_state(self) -> dict[str, Any]:
        return {"data": _jsonable(self.iterator.get_state()), "compute": self.compute.state()}

    def finish(self) -> dict[str, Any] | None:
        if self.data.eval:
            return self.run.writer.write(self.cfg.train.steps, self.eval_loss(), prefix="eval")
        return None


def evaluate_loss(eval_fn, params, data: SFTData, mesh) -> dict[str, float]:
    nll, tokens = 0.0, 0.0
    for local in data.eval_batches():
        n = local["input_ids"].shape[0]
        pad = (-n) % (mesh.shape["data"] * mesh.shape["fsdp"])
        if pad:  # pad the last batch with rows whose loss mask is 0
            local = {k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)]) for k, v in local.items()}
        a, b = eval_fn(params, global_batch({k: local[k] for k in BATCH_KEYS if k in local}, mesh))
        nll, tokens = nll + float(a), tokens + float(b)
    return {"loss": nll / max(tokens, 1.0), "tokens": tokens}


def _skipped(opt_state) -> int:
    counts = optim_lib.nonfinite_counts(opt_state)
    return int(counts[1]) if counts is not None else 0


def _jsonable(state: Any) -> Any:
    return json.loads(json.dumps(state, default=lambda o: o.decode() if isinstance(o, bytes) else str(o)))
