"""The programs of a run, built abstractly: the same step functions, shardings and jit options the
SFT loop (`sft.train`) and the RL loop (`rl.train`, its learners, the sampler) use, over
`jax.ShapeDtypeStruct`s at the run's configured shapes.

SFT: the train step per length bucket. RL: the rollout's prefill and decode (the sampler's own
jitted functions), the learner's no-gradient pass (PPO values / GRPO old log-probs), the reference
pass when a KL penalty is on, and the update step, at the longest length bucket (the worst case).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sftrl_jax import ops
from sftrl_jax.config import ConfigError
from sftrl_jax.models import build, convert, lora
from sftrl_jax.models import config as model_config
from sftrl_jax.parallel import rules
from sftrl_jax.planning import flops as flops_lib
from sftrl_jax.train.state import ModelSection, preset_config

# Programs are compiled here on fake CPU devices for an accelerator: with the seam's plain XLA ops
# (`ops.xla`: the path every backend falls back to), not the CPU backend's layouts and custom VJPs
# (whose optimisation barrier kept XLA from turning the FSDP weight gradients' all-reduce into a
# reduce-scatter) nor its native kernels (one CPU device only). Attention runs in blocks of query rows
# (`ops.xla.attention_blocked`): the memory of the fused kernel (cuDNN, the TPU's) an accelerator
# runs, which XLA:CPU cannot, instead of XLA's whole [B, N, T, S] fp32 scores (`PLAN_POLICY_XLA`,
# `sftrl plan --attention xla`: the figures before 2026-12-08).
PLAN_POLICY_XLA = ops.Policy(reference=True)
PLAN_POLICY = ops.Policy(reference=True, attention="blocked")


@dataclasses.dataclass
class Program:
    name: str
    fn: Callable  # the jitted function, as the run jits it
    args: tuple  # abstract arguments (ShapeDtypeStructs with shardings)
    # Per device: the whole program (train steps, passes), one decode step for the decode program
    # (its loop's trip count is the run's to know; `analysis.hlo_flops` counts such a body once).
    ideal_flops: float | None
    mesh: jax.sharding.Mesh
    loop_trips: int = 1  # iterations of the program's main loop: micro-batches of a step, decode steps
    # Training steps: the arguments of `planning.memory.train_step_bytes` (the analytic figure).
    analytic: dict | None = None


def model_config_of(section: ModelSection) -> model_config.ModelConfig:
    """The run's model config without its weights: a preset, an HF folder's config.json, or our
    checkpoint's model_config.json (only that file needs to exist)."""
    if section.preset is not None:
        return preset_config(section.preset, section.text_overrides)
    path = section.init
    folder, given = (path, None) if os.path.isdir(path) else (os.path.dirname(path), os.path.basename(path))
    if given in (None, "config.json") and os.path.isfile(os.path.join(folder, "config.json")):
        return convert.read_config(os.path.join(folder, "config.json"))[0]  # a bad file: one line naming it
    from sftrl_jax.models import checkpoint  # orbax: imported only for our checkpoints

    if given in (None, checkpoint.CONFIG_FILE) and os.path.isfile(os.path.join(folder, checkpoint.CONFIG_FILE)):
        return checkpoint.read_checkpoint_config(folder)[0]
    raise ConfigError(
        f"model.init {path!r} holds no config.json or model_config.json: give model.preset (e.g. "
        "llama-3.2-11b-vision) or a folder with the checkpoint's config.json"
    )


def _sds(shape, dtype, names, mesh) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=rules.named_sharding(names, shape, mesh))


def _batch(spec: dict[str, tuple[tuple[int, ...], Any]], mesh) -> dict[str, jax.ShapeDtypeStruct]:
    return {k: _sds(shape, dtype, ("batch",) + (None,) * (len(shape) - 1), mesh) for k, (shape, dtype) in spec.items()}


def _image_spec(mc, rows: int, length: int, images: int) -> dict:
    if not images or not isinstance(mc, model_config.MllamaConfig):
        return {}
    v = mc.vision
    c, px = v.max_num_tiles, v.image_size
    return {
        "pixel_values": ((rows, images, c, 3, px, px), jnp.float32),
        "aspect_ratio_ids": ((rows, images), jnp.int32),
        "aspect_ratio_mask": ((rows, images, c), jnp.int32),
        "cross_attention_mask": ((rows, length, images, c), jnp.int32),
    }


def _abstract_run(cfg, mesh, *, total_steps: int, wrap=None, policy=None):
    """(the run as `train.run.AbstractRun` builds it, the model config)."""
    from sftrl_jax.train.run import AbstractRun

    section = cfg.model
    mc = model_config_of(section)
    param_dtype = jnp.dtype(section.param_dtype)
    dtype = jnp.dtype(section.dtype) if section.dtype else None

    def make():
        model = build.model_class(mc)(
            mc,
            param_dtype=param_dtype,
            dtype=dtype,
            remat=section.remat,
            scan_layers=section.scan_layers,
            rngs=nnx.Rngs(0),
        )
        if _lora(cfg):  # the run's adapters and frozen base (`train.run.Run`)
            lora.add(model, cfg.lora, seed=0)
        return wrap(model) if wrap else model

    run = AbstractRun(make, mesh, optim=cfg.optim, total_steps=total_steps, policy=policy or PLAN_POLICY)
    return run, mc


def _lora(cfg) -> bool:
    return getattr(cfg, "lora", None) is not None and cfg.lora.enabled


def _train_flops(cfg, run, mc, *, rows: int, length: int, images: int) -> float:
    """The ideal FLOPs of a training step of `run` (LoRA: the frozen base's backward through the
    activations only, none at all through an unadapted vision side)."""
    trainable = lora.partition(run.state.params)[0] if _lora(cfg) else None
    vision = trainable is None or any(
        "vision_model" in jax.tree_util.keystr(k) or "multi_modal_projector" in jax.tree_util.keystr(k)
        for k, _ in jax.tree_util.tree_leaves_with_path(trainable)
    )
    return flops_lib.ideal_train_flops(
        mc,
        rows=rows,
        length=length,
        images=images,
        remat=cfg.model.remat,
        frozen_base=_lora(cfg),
        vision_trained=vision,
    )


def _devices(mesh) -> int:
    return int(np.prod(list(mesh.shape.values())))


def sft_programs(cfg, mesh, *, images: int = 0, policy: ops.Policy | None = None) -> list[Program]:
    """The SFT run's train step (`sft.train.programs`) at each length bucket."""
    from sftrl_jax.sft import train as sft_train

    t, d = cfg.train, cfg.data
    run, mc = _abstract_run(cfg, mesh, total_steps=t.steps, policy=policy)
    step = sft_train.programs(run, cfg)["train_step"]
    out = []
    for length in sorted(set(d.buckets or ())) or [d.max_length]:
        rows = d.batch_size
        spec = {k: ((rows, length), jnp.int32) for k in ("input_ids", "attention_mask", "targets")}
        spec["loss_mask"] = ((rows, length), jnp.float32)
        spec.update(_image_spec(mc, rows, length, images))
        ideal = _train_flops(cfg, run, mc, rows=rows, length=length, images=images)
        trips = t.grad_accum
        args = (run.state, _batch(spec, mesh))
        analytic = _analytic(cfg.model, mc, run.state, mesh, rows=rows // trips, length=length, images=images)
        out.append(Program(f"sft_step[{length}]", step, args, ideal / _devices(mesh), mesh, trips, analytic))
    return out


def rl_programs(cfg, mesh, *, images: int = 0, policy: ops.Policy | None = None) -> list[Program]:
    """The RL run's programs: the sampler's prefill and decode (`sampling.sampler`), and the
    learner's own (`Learner.programs`: its no-gradient pass, the reference pass when a KL penalty is
    on, the update step) at the longest length bucket."""
    from sftrl_jax.rl import batching
    from sftrl_jax.rl.config import check_mesh
    from sftrl_jax.sampling import inputs, methods
    from sftrl_jax.sampling import sampler as sampler_lib

    check_mesh(cfg, mesh)
    t, algo, learner = cfg.train, cfg.algo_cfg, cfg.learner_class
    wrap = lambda m: learner.policy_module(m, seed=0)  # noqa: E731
    run, mc = _abstract_run(cfg, mesh, total_steps=t.updates * cfg.updates_steps(), wrap=wrap, policy=policy)
    temperature = cfg.sampling.temperature
    length = max(t.length_buckets)
    n = _devices(mesh)
    programs = []

    # Rollout: the sampler's prefill and decode over the language model's parameters as the sampler
    # prepares them (`sampler.prepare_weights`: matrices in the compute dtype, laid out for sampling by
    # `sampling.layout`), one row per env (GRPO: group_size rows per prompt), prompts as long as the
    # longest bucket leaves room for.
    layout = sampler_lib.resolve_layout(cfg.sampling.layout, mc, mesh)
    lm_graphdef, lm_params = nnx.split(learner.language_model(run.module()))
    lm_params = sampler_lib.abstract_weights(lm_params, mesh, layout, cfg.model.dtype or cfg.model.param_dtype)
    rows = inputs.batch_bucket(learner.rollout_rows(cfg), sampler_lib.batch_devices(mesh, layout))
    new = cfg.sampling.max_new_tokens
    prompt = inputs.prompt_bucket(max(length - new, 1))
    scfg = sampler_lib.SamplerConfig(
        max_new_tokens=new,
        method=methods.Method(temperature=float(temperature), top_p=1.0, top_k=0),
        pad_id=0,
        layout=layout,
    )
    with rules.using(layout):
        pbatch = _batch(
            {
                "input_ids": ((rows, prompt), jnp.int32),
                "attention_mask": ((rows, prompt), jnp.int32),
                "row_valid": ((rows,), jnp.bool_),
                **_image_spec(mc, rows, prompt, images),
            },
            mesh,
        )
    stops = jax.ShapeDtypeStruct((4,), jnp.int32)
    key = jax.eval_shape(lambda: jax.random.key(0))
    kw = dict(graphdef=lm_graphdef, cfg=scfg)
    prefill = run.compile(functools.partial(sampler_lib.prefill, **kw))
    prefill_args = (lm_params, pbatch, stops, key)
    fwd = flops_lib.forward_flops(mc, rows=rows, length=prompt, images=images)
    programs.append(Program("rollout_prefill", prefill, prefill_args, fwd / n, mesh))
    with jax.set_mesh(mesh):
        dstate = sampler_lib.abstract_state(jax.eval_shape(prefill, *prefill_args), mesh, layout)
    decode = run.compile(functools.partial(sampler_lib.decode, **kw), donate_argnums=(1,))
    steps = max(new - 1, 1)
    # One step, attending to the filled slots: prompt + new / 2 on average over the steps. (The
    # attention's loop over the filled 128-slot blocks has a run-time trip count: counted once, one
    # block's worth.)
    dec = flops_lib.decode_flops(mc, rows=rows, keys=prompt + new // 2, images=images)
    programs.append(Program("rollout_decode", decode, (lm_params, dstate), dec / n, mesh, steps))

    # The learner's programs at the longest bucket: the batch arrays `rl.batching` builds.
    def spec(rows_):
        return {**batching.batch_spec(rows_, length), **_image_spec(mc, rows_, length, images)}

    compiled = learner.programs(run, cfg)
    mb, S = algo.micro_batch, algo.samples_per_step
    nograd = compiled[learner.nograd_name]
    fwd_mb = flops_lib.forward_flops(mc, rows=mb, length=length, images=images)
    programs.append(Program(learner.nograd_name, nograd, (run.state.params, _batch(spec(mb), mesh)), fwd_mb / n, mesh))
    extra = learner.update_arrays(algo, S)
    if algo.kl_coef > 0:
        programs.append(Program("reference_pass", nograd, (run.state.params, _batch(spec(mb), mesh)), fwd_mb / n, mesh))
        extra["ref_token_logp"] = ((S, length), jnp.float32)
    if algo.tis_cap > 0:  # the TIS weight's denominator
        extra["sampler_token_logp"] = ((S, length), jnp.float32)
    ubatch = _batch({**spec(S), **extra}, mesh)
    ideal = _train_flops(cfg, run, mc, rows=S, length=length, images=images)
    analytic = _analytic(cfg.model, mc, run.state, mesh, rows=mb, length=length, images=images)
    update = compiled["update"]
    programs.append(
        Program(f"{cfg.algo}_update[{length}]", update, (run.state, ubatch), ideal / n, mesh, S // mb, analytic)
    )
    return programs


def _analytic(section: ModelSection, mc, state, mesh, *, rows: int, length: int, images: int) -> dict:
    return dict(
        cfg=mc,
        # the parameters that have gradients (a LoRA run's: adapters and value head)
        n_params=int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(lora.partition(state.params)[0]))),
        devices=_devices(mesh),
        batch_ways=rules.batch_ways(mesh),
        rows=rows,
        length=length,
        compute_dtype=section.dtype or section.param_dtype,
        remat=section.remat,
        images=images,
    )


def images_default(cfg) -> int:
    """Image slots per row the run's batches carry: RL from the task (`-vl`); SFT from the data
    (`data.max_images` when the first training file's first example has an image, or, when the file
    is not here, when its path names a -vl task)."""
    if hasattr(cfg, "env"):
        return 1 if cfg.env.task.endswith("-vl") else 0
    for f in cfg.data.train_files:
        if os.path.exists(f):
            try:
                with open(f, encoding="utf-8") as fh:
                    head = fh.read(1 << 16)
                return cfg.data.max_images if '"image"' in head else 0
            except OSError:
                pass
        if "_vl" in os.path.basename(os.path.dirname(f)) or "_vl" in os.path.basename(f):
            return cfg.data.max_images
    return 0


def programs_for(cfg, mesh, *, images: int | None = None, policy: ops.Policy | None = None) -> list[Program]:
    """The run's programs traced under the ops `policy` (default `PLAN_POLICY`: XLA's ops, what an
    accelerator runs where no fused kernel applies; `ops.Policy(platform="tpu")` etc. for export)."""
    images = images_default(cfg) if images is None else images
    if hasattr(cfg, "env"):
        return rl_programs(cfg, mesh, images=images, policy=policy)
    return sft_programs(cfg, mesh, images=images, policy=policy)
