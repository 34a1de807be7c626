"""Supervised fine-tuning: the pure sharded train step and the resumable loop.

    sftrl sft --config configs/sft/gp_l_tiny.yaml train.steps=50

`train_step(state, batch) -> (state, metrics)` is jitted once per padded length bucket, with the
state donated and sharded by the logical-axis rules; gradient accumulation scans over micro-batches
inside the step (one optimiser update per call). The loop resumes from the run folder's latest
checkpoint (params, optimiser, step, RNG, data iterator), saves and exits 0 on SIGTERM, skips steps
with non-finite gradients and aborts after `train.max_bad_steps` of them in a row. The run folder is
locked for the run (`train/run_lock.py`: a second run on it stops with one line); checkpoints,
snapshots and `final` are written atomically, and a failed save stops the run with one line
(`errors.SaveError`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sftrl_jax import config as config_lib
from sftrl_jax import ops
from sftrl_jax import progress as progress_lib
from sftrl_jax.config import ConfigError
from sftrl_jax.data import processor
from sftrl_jax.data.sft import SFTData, SFTDataConfig
from sftrl_jax.errors import UserError
from sftrl_jax.evaluation.compute import ComputeCounter
from sftrl_jax.models import logprobs
from sftrl_jax.parallel import distributed
from sftrl_jax.parallel import mesh as mesh_lib
from sftrl_jax.parallel.placement import global_batch, on_mesh, param_count
from sftrl_jax.sft.losses import sft_loss_from_logp
from sftrl_jax.train import accumulate as accum_lib
from sftrl_jax.train import checkpoint as ckpt_lib
from sftrl_jax.train import metrics as metrics_lib
from sftrl_jax.train import optim as optim_lib
from sftrl_jax.train import run_lock
from sftrl_jax.train.state import (
    ModelSection,
    TrainState,
    abstract_like,
    load_model,
    rng_data,
    split_params,
    tokenizer_for,
)

IMAGE_KEYS = logprobs.IMAGE_KEYS
BATCH_KEYS = ("input_ids", "attention_mask", "targets", "loss_mask", *IMAGE_KEYS)


@dataclasses.dataclass(frozen=True)
class TrainSection:
    run_dir: str = "runs/sft"
    steps: int = 100  # optimiser steps
    grad_accum: int = 1  # micro-batches per optimiser step (data.batch_size is the whole step's batch)
    log_every: int = 10
    eval_every: int = 0  # 0 = no periodic eval loss
    save_every: int = 100
    keep: int = 3  # checkpoints kept
    seed: int = 0
    mesh: str = "data=1,fsdp=-1,tensor=1"  # -1 = the rest of the devices
    devices: int | None = None  # use only the first N devices (single-process runs); None = all
    max_bad_steps: int = 5  # abort after this many non-finite steps in a row
    resume: bool = True  # continue from the run folder's latest checkpoint
    tensorboard: bool = False
    async_checkpointing: bool = True
    progress: bool = True  # a tqdm bar on a terminal, a line per interval in a log (sftrl_jax/progress.py)
    distributed: bool = False  # jax.distributed with cluster auto-detection (or set SFTRL_COORDINATOR, ...)
    d_init: int = 0  # tokens of the SFT that produced model.init (for the compute axis)
    # > 0: every N steps (never step 0) the model as <run_dir>/snapshots/<step>, a model checkpoint
    # like <run_dir>/final (`sftrl eval --ckpt`): a study's intermediate compute points; 0 = none
    snapshot_every: int = 0

    def __post_init__(self):
        for name in ("steps", "grad_accum", "log_every", "save_every", "keep", "max_bad_steps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"train.{name} must be positive, got {getattr(self, name)}")
        if self.snapshot_every < 0:
            raise ConfigError(f"train.snapshot_every must be >= 0 (0 = no snapshots), got {self.snapshot_every}")
        config_lib.check_ranges(self, eval_every="[0, inf)", seed="[0, inf)", devices="[1, inf)", d_init="[0, inf)")


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    model: ModelSection
    data: SFTDataConfig
    optim: optim_lib.OptimConfig = dataclasses.field(default_factory=optim_lib.OptimConfig)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)


# ----------------------------------------------------------------------------------------------
# The step


model_inputs = logprobs.model_inputs  # the model call's inputs besides input_ids (kept for callers)


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
        grads, aux = accum_lib.accumulate(loss_fn, state.params, batch, n_micro=grad_accum)
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


def train(cfg: SFTConfig, *, stop_after: int | None = None) -> dict[str, Any]:
    """Runs (or resumes) the SFT run of `cfg`; returns the last logged metrics.

    `stop_after` ends the loop after that many steps *of this call* without finishing the run
    (tests use it to interrupt a run and resume it).
    """
    t = cfg.train
    distributed.maybe_initialize(auto=t.distributed)
    lock = run_lock.acquire(t.run_dir)  # one run per folder: a second one stops here, writing nothing
    try:
        return _train(cfg, stop_after=stop_after)
    finally:
        lock.release()


def _train(cfg: SFTConfig, *, stop_after: int | None) -> dict[str, Any]:
    t = cfg.train
    os.makedirs(t.run_dir, exist_ok=True)
    if jax.process_index() == 0:
        config_lib.dump_yaml(cfg, os.path.join(t.run_dir, "config.yaml"))
    devices = jax.devices() if t.devices is None else jax.devices()[: t.devices]
    mesh = mesh_lib.make_mesh(mesh_lib.parse_mesh_spec(t.mesh), devices=devices)
    batch_axes = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.data.batch_size % (t.grad_accum * batch_axes):
        raise ConfigError(
            f"data.batch_size {cfg.data.batch_size} must be divisible by train.grad_accum ({t.grad_accum}) x "
            f"the batch-sharding mesh axes data*fsdp ({batch_axes})"
        )
    tokenizer = tokenizer_for(cfg.model)
    model = load_model(cfg.model, mesh=mesh, seed=t.seed)  # not under set_mesh: eval_shape of logical names
    vocab = model.config.text.vocab_size
    if tokenizer.vocab_size > vocab:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is {vocab}")
    data = SFTData(cfg.data, tokenizer, image_processor=processor.for_model(model))
    graphdef, params, rest = split_params(model)
    del model
    lr_fn = optim_lib.schedule(cfg.optim, t.steps)
    tx = optim_lib.make_optimizer(cfg.optim, params, total_steps=t.steps)
    with jax.set_mesh(mesh):
        opt_state = optim_lib.init_state(tx, params, mesh)
    state = TrainState(step=jnp.int32(0), params=params, opt_state=opt_state, rng=rng_data(t.seed))
    state = on_mesh(state, mesh)
    state_shardings = jax.tree.map(lambda x: x.sharding, state)

    checkpointer = ckpt_lib.Checkpointer(
        os.path.join(t.run_dir, "checkpoints"), keep=t.keep, every=t.save_every, async_save=t.async_checkpointing
    )
    iterator = data.iterator()
    compute = ComputeCounter(n_params=param_count(params), d_init=t.d_init)
    start, resumed = 0, None
    if t.resume and checkpointer.latest_step() is not None:
        step0, restored, extra = checkpointer.restore_latest(abstract_like(state))
        state = restored
        iterator.set_state(extra["data"])
        compute = ComputeCounter.from_state(extra["compute"])
        start = resumed = int(step0)
        print(f"sft: resumed {t.run_dir} at step {start}")

    policy = ops.policy_for(mesh)
    step_fn = jax.jit(
        make_train_step(graphdef, rest, tx, grad_accum=t.grad_accum, lr_fn=lr_fn, policy=policy),
        donate_argnums=0,
        out_shardings=(state_shardings, None),
    )
    eval_fn = jax.jit(make_eval_step(graphdef, rest, policy=policy))

    def extra_state() -> dict[str, Any]:
        return {"data": _jsonable(iterator.get_state()), "compute": compute.state()}

    # Process 0 writes metrics.jsonl (the losses are global); others keep their own file.
    name = "metrics.jsonl" if jax.process_index() == 0 else f"metrics.process{jax.process_index()}.jsonl"
    metrics_lib.rewind(os.path.join(t.run_dir, name), checkpoint_step=resumed)  # each step logged once
    writer = metrics_lib.MetricsWriter(t.run_dir, filename=name, tensorboard=t.tensorboard and jax.process_index() == 0)
    last: dict[str, Any] = {}
    bad_in_row = 0
    tokens_window, padded_window, t_window = 0, 0, time.perf_counter()
    peak = metrics_lib.peak_flops()
    progress = _progress(t, start)
    steps_this_call = 0
    try:
        with ckpt_lib.PreemptionGuard() as guard, jax.set_mesh(mesh):
            for step in range(start, t.steps):
                local = next(iterator)
                batch = global_batch({k: local[k] for k in BATCH_KEYS if k in local}, mesh, pad_id=tokenizer.pad_id)
                state, m = step_fn(state, batch)
                n_tokens = int(local["attention_mask"].sum()) * jax.process_count()
                tokens_window += n_tokens
                padded_window += local["attention_mask"].size * jax.process_count()
                compute.add_train(
                    n_tokens,
                    n_images=int(local["pixel_values"].shape[1] * local["pixel_values"].shape[0])
                    if "pixel_values" in local
                    else 0,
                )
                if not bool(m["finite"]):
                    bad_in_row += 1
                    if bad_in_row >= t.max_bad_steps:
                        raise UserError(
                            f"sft: {bad_in_row} steps in a row had non-finite gradients (last at step {step + 1}); "
                            f"aborting. Lower optim.lr, check the data, or resume from the last checkpoint "
                            f"({checkpointer.latest_step()}) with other settings."
                        )
                else:
                    bad_in_row = 0
                done = step + 1
                if done % t.log_every == 0 or done == t.steps:
                    elapsed = max(time.perf_counter() - t_window, 1e-9)
                    tps = tokens_window / elapsed
                    row = {k: float(v) for k, v in m.items()}
                    row.update(
                        tokens_per_s=tps,
                        padding_fraction=1.0 - tokens_window / max(padded_window, 1),
                        mfu=6.0 * compute.n_params * tps / peak if peak else float("nan"),
                        skipped_nonfinite=_skipped(state.opt_state),
                        gflops=compute.flops(rl=False) / 1e9,
                        truncated=int(local["truncated"].sum()),
                    )
                    last = writer.write(done, row, prefix="train")
                    tokens_window, padded_window, t_window = 0, 0, time.perf_counter()
                    if progress is not None:
                        progress.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{tps:.0f}")
                if t.eval_every and done % t.eval_every == 0:
                    writer.write(done, evaluate_loss(eval_fn, state.params, data, mesh), prefix="eval")
                # the snapshot before the checkpoint: a run resumed from the checkpoint of `done` has it
                snapshot = ckpt_lib.snapshot_path(t.run_dir, done, every=t.snapshot_every)
                if snapshot is not None:
                    save_model(graphdef, state.params, rest, snapshot)
                checkpointer.maybe_save(done, state, extra_state())
                checkpointer.check()  # a background save that failed stops the run now
                if progress is not None:
                    progress.update(1)
                steps_this_call += 1
                if guard.requested:
                    if checkpointer.latest_step() != done:
                        checkpointer.save(done, state, extra_state())
                    print(f"sft: SIGTERM received; saved step {done} to {checkpointer.directory}; exiting")
                    break
                if stop_after is not None and steps_this_call >= stop_after:
                    break
            else:
                if checkpointer.latest_step() != t.steps:
                    checkpointer.save(t.steps, state, extra_state())
                if data.eval:
                    last.update(writer.write(t.steps, evaluate_loss(eval_fn, state.params, data, mesh), prefix="eval"))
                checkpointer.wait()  # the last checkpoint is on disk before `final` says the run is done
                save_final(graphdef, state.params, rest, t.run_dir)
    finally:
        checkpointer.close()
        writer.close()
        if progress is not None:
            progress.close()
    return last


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


def save_final(graphdef, params, rest, run_dir: str) -> str:
    """The trained model as a model checkpoint (`<run_dir>/final`) that `sftrl eval/rl/export` load."""
    return save_model(graphdef, params, rest, os.path.join(run_dir, "final"))


def save_model(graphdef, params, rest, path: str) -> str:
    """The model at `params` as a model checkpoint at `path` (final, or a `train.snapshot_every` snapshot)."""
    from sftrl_jax.models.checkpoint import save_checkpoint

    save_checkpoint(nnx.merge(graphdef, params, rest), path)
    return path


def _skipped(opt_state) -> int:
    counts = optim_lib.nonfinite_counts(opt_state)
    return int(counts[1]) if counts is not None else 0


def _jsonable(state: Any) -> Any:
    return json.loads(json.dumps(state, default=lambda o: o.decode() if isinstance(o, bytes) else str(o)))


def _progress(t: TrainSection, start: int):
    enabled = t.progress and jax.process_index() == 0
    return progress_lib.bar(total=t.steps, initial=start, desc="sft", unit="step", enabled=enabled)
