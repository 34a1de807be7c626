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
from sftrl_jax.models import build, convert
from sftrl_jax.models import config as model_config
from sftrl_jax.parallel import rules
from sftrl_jax.planning import flops as flops_lib
from sftrl_jax.train.state import ModelSection, TrainState, preset_config

# Programs are compiled here on fake CPU devices for an accelerator: with the seam's plain XLA ops
# (`ops.xla`: the path every backend falls back to), not the CPU backend's layouts and custom VJPs
# (whose optimisation barrier kept XLA from turning the FSDP weight gradients' all-reduce into a
# reduce-scatter) nor its native kernels (one CPU device only).
PLAN_POLICY = ops.Policy(reference=True)


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


def _abstract_state(section: ModelSection, mesh, tx_fn, *, wrap=None):
    """(graphdef, abstract params, rest, abstract TrainState, its shardings, model config)."""
    mc = model_config_of(section)
    param_dtype = jnp.dtype(section.param_dtype)
    dtype = jnp.dtype(section.dtype) if section.dtype else None

    def make():
        model = build.model_class(mc)(mc, param_dtype=param_dtype, dtype=dtype, remat=section.remat, rngs=nnx.Rngs(0))
        model = build.scan_layers(model, section.scan_layers)
        return wrap(model) if wrap else model

    graphdef, params, rest = nnx.split(nnx.eval_shape(make), nnx.Param, ...)
    shardings = rules.state_shardings(params, mesh)
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, shardings)
    tx = tx_fn(params)
    opt_state = _abstract_opt_state(tx, params, shardings, mesh)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
        params=params,
        opt_state=opt_state,
        rng=jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated),
    )
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    return graphdef, params, rest, state, state_shardings, tx, mc


def _abstract_opt_state(tx, params, shardings, mesh):
    """The optimiser state as `optim.init_state` lays it out (moments sharded like their parameters)."""
    from sftrl_jax.train import optim as optim_lib

    init = jax.jit(optim_lib.sharded_init(tx, params, mesh))
    with jax.set_mesh(mesh):
        out = init.lower(params).compile().output_shardings
    abstract = jax.eval_shape(init, params)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, out)


def _devices(mesh) -> int:
    return int(np.prod(list(mesh.shape.values())))


def sft_programs(cfg, mesh, *, images: int = 0, policy: ops.Policy | None = None) -> list[Program]:
    from sftrl_jax.sft.train import make_train_step
    from sftrl_jax.train import optim as optim_lib

    t, d = cfg.train, cfg.data
    tx_fn = lambda params: optim_lib.make_optimizer(cfg.optim, params, total_steps=t.steps)  # noqa: E731
    graphdef, _, rest, state, state_shardings, tx, mc = _abstract_state(cfg.model, mesh, tx_fn)
    lr_fn = optim_lib.schedule(cfg.optim, t.steps)
    step = jax.jit(
        make_train_step(graphdef, rest, tx, grad_accum=t.grad_accum, lr_fn=lr_fn, policy=policy or PLAN_POLICY),
        donate_argnums=0,
        out_shardings=(state_shardings, None),
    )
    buckets = sorted(set(d.buckets or ())) or [d.max_length]
    out = []
    for length in buckets:
        rows = d.batch_size
        spec = {
            "input_ids": ((rows, length), jnp.int32),
            "attention_mask": ((rows, length), jnp.int32),
            "targets": ((rows, length), jnp.int32),
            "loss_mask": ((rows, length), jnp.float32),
            **_image_spec(mc, rows, length, images),
        }
        ideal = flops_lib.ideal_train_flops(mc, rows=rows, length=length, images=images, remat=cfg.model.remat)
        trips = t.grad_accum
        args = (state, _batch(spec, mesh))
        analytic = _analytic(cfg.model, mc, state, mesh, rows=rows // trips, length=length, images=images)
        out.append(Program(f"sft_step[{length}]", step, args, ideal / _devices(mesh), mesh, trips, analytic))
    return out


def rl_programs(cfg, mesh, *, images: int = 0, policy: ops.Policy | None = None) -> list[Program]:
    from sftrl_jax.rl import grpo as grpo_lib
    from sftrl_jax.rl import ppo as ppo_lib
    from sftrl_jax.rl.config import check_mesh
    from sftrl_jax.sampling import inputs, methods
    from sftrl_jax.sampling import sampler as sampler_lib
    from sftrl_jax.train import optim as optim_lib

    check_mesh(cfg, mesh)
    t, algo = cfg.train, cfg.algo_cfg
    total = t.updates * cfg.updates_steps()
    tx_fn = lambda params: optim_lib.make_optimizer(cfg.optim, params, total_steps=total)  # noqa: E731
    wrap = (lambda m: ppo_lib.PPOLearner.policy_module(m, seed=0)) if cfg.algo == "ppo" else None
    graphdef, params, rest, state, state_shardings, tx, mc = _abstract_state(cfg.model, mesh, tx_fn, wrap=wrap)
    policy = policy or PLAN_POLICY
    options = None  # the CPU-only exact-rounding options are no part of an accelerator's program

    def compile_(fn, **kw):
        return jax.jit(ops.traced_with(fn, policy), compiler_options=options, **kw)

    temperature = cfg.sampling.temperature
    lr_fn = optim_lib.schedule(cfg.optim, total)
    length = max(t.length_buckets)
    n = _devices(mesh)
    programs = []

    # Rollout: the sampler's prefill and decode over the language model's parameters as the sampler
    # prepares them (`sampler.prepare_weights`: matrices in the compute dtype, laid out for sampling by
    # `sampling.layout`), one row per env (GRPO: group_size rows per prompt), prompts as long as the
    # longest bucket leaves room for.
    layout = sampler_lib.resolve_layout(cfg.sampling.layout, mc, mesh)
    lm_graphdef, lm_params = _language_model_split(graphdef, params, rest, cfg.algo)
    lm_params = _prepared(lm_params, mesh, layout, cfg.model.dtype or cfg.model.param_dtype)
    rows = cfg.env.num_envs * (algo.group_size if cfg.algo == "grpo" else 1)
    rows = inputs.batch_bucket(rows, sampler_lib.batch_devices(mesh, layout))
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
    prefill = jax.jit(ops.traced_with(functools.partial(sampler_lib._prefill, **kw), policy))
    prefill_args = (lm_params, pbatch, stops, key)
    fwd = flops_lib.forward_flops(mc, rows=rows, length=prompt, images=images)
    programs.append(Program("rollout_prefill", prefill, prefill_args, fwd / n, mesh))
    with jax.set_mesh(mesh):
        dstate = jax.eval_shape(prefill, *prefill_args)
    dstate = _decode_state_shardings(dstate, mesh, layout)
    decode = jax.jit(ops.traced_with(functools.partial(sampler_lib._decode, **kw), policy), donate_argnums=(1,))
    steps = max(new - 1, 1)
    # One step, attending to the filled slots: prompt + new / 2 on average over the steps. (The
    # attention's loop over the filled 128-slot blocks has a run-time trip count: counted once, one
    # block's worth.)
    dec = flops_lib.forward_flops(mc, rows=rows, length=1, keys=prompt + new // 2, images=0)
    programs.append(Program("rollout_decode", decode, (lm_params, dstate), dec / n, mesh, steps))

    # Training passes at the longest bucket.
    def spec(rows_):
        s = {k: ((rows_, length), jnp.int32) for k in ("input_ids", "attention_mask", "targets")}
        s.update({k: ((rows_, length), jnp.float32) for k in ("resp_mask", "weights", "old_token_logp")})
        s["value_index"] = ((rows_,), jnp.int32)
        s.update(_image_spec(mc, rows_, length, images))
        return s

    mb = algo.micro_batch
    if cfg.algo == "ppo":
        nograd = compile_(ppo_lib.make_value_fn(graphdef, rest, temperature))
        step_fn = ppo_lib.make_update_step(graphdef, rest, tx, algo, lr_fn=lr_fn, temperature=temperature)
        extra = {k: ((algo.samples_per_step,), jnp.float32) for k in ("old_values", "advantages", "returns")}
        nograd_name = "values_pass"
    else:
        nograd = compile_(grpo_lib.make_logp_fn(graphdef, rest, temperature))
        step_fn = grpo_lib.make_update_step(graphdef, rest, tx, algo, lr_fn=lr_fn, temperature=temperature)
        extra = {"advantages": ((algo.samples_per_step,), jnp.float32)}
        nograd_name = "old_logp_pass"
    fwd_mb = flops_lib.forward_flops(mc, rows=mb, length=length, images=images)
    programs.append(Program(nograd_name, nograd, (params, _batch(spec(mb), mesh)), fwd_mb / n, mesh))
    if algo.kl_coef > 0:
        programs.append(Program("reference_pass", nograd, (params, _batch(spec(mb), mesh)), fwd_mb / n, mesh))
        extra["ref_token_logp"] = ((algo.samples_per_step, length), jnp.float32)
    update = compile_(step_fn, donate_argnums=0, out_shardings=(state_shardings, None))
    ubatch = _batch({**spec(algo.samples_per_step), **extra}, mesh)
    ideal = flops_lib.ideal_train_flops(
        mc, rows=algo.samples_per_step, length=length, images=images, remat=cfg.model.remat
    )
    trips = algo.samples_per_step // mb
    analytic = _analytic(cfg.model, mc, state, mesh, rows=mb, length=length, images=images)
    programs.append(Program(f"{cfg.algo}_update[{length}]", update, (state, ubatch), ideal / n, mesh, trips, analytic))
    return programs


def _analytic(section: ModelSection, mc, state, mesh, *, rows: int, length: int, images: int) -> dict:
    return dict(
        cfg=mc,
        n_params=int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))),
        devices=_devices(mesh),
        batch_ways=rules.batch_ways(mesh),
        rows=rows,
        length=length,
        compute_dtype=section.dtype or section.param_dtype,
        remat=section.remat,
        param_dtype=section.param_dtype,
        images=images,
        scan_layers=section.scan_layers,
    )


def _language_model_split(graphdef, params, rest, algo: str):
    """The language model's (graphdef, params) inside the trained module (PPO: without its head)."""
    if algo != "ppo":
        return graphdef, params
    module = nnx.merge(graphdef, params, rest)
    lm_graphdef, lm_params = nnx.split(module.model)
    return lm_graphdef, lm_params


def _prepared(params, mesh, layout: str, dtype):
    """Abstract parameters as `sampler.prepare_weights` leaves them: floating matrices in the compute
    `dtype`, every leaf in the `layout` table's sharding."""
    from sftrl_jax.sampling import sampler as sampler_lib

    shardings = sampler_lib.layout_shardings(params, mesh, layout)

    def one(x, s):
        cast = sampler_lib._is_matrix(x)
        return jax.ShapeDtypeStruct(x.shape, jnp.dtype(dtype) if cast else x.dtype, sharding=s)

    return jax.tree.map(one, params, shardings)


def _decode_state_shardings(state, mesh, layout: str):
    """The decode state's arrays sharded as the prefill leaves them under the `layout` table: the KV
    cache by its logical names (batch, kv heads), other leading batch axes over the batch mesh axes
    where they divide, scalars replicated."""
    from sftrl_jax.models import kv_cache

    def shard(x):
        names = ("batch",) + (None,) * (x.ndim - 1) if x.ndim else ()
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rules.named_sharding(names, x.shape, mesh))

    with rules.using(layout):
        out = jax.tree.map(shard, state)
        cache = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            state.cache,
            kv_cache.shardings(state.cache, mesh),
        )
    return dataclasses.replace(out, cache=cache)


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
