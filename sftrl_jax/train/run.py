"""The one run harness: what every training run owns, built once, for `sftrl sft` and `sftrl rl`.

    run = Run(cfg, name="sft", optim=cfg.optim, total_steps=cfg.train.steps)
    run.loop(job, total=cfg.train.steps, max_bad=cfg.train.max_bad_steps)

`Run` owns, in this order: the multi-process start, the run folder's lock (`run_lock`: a second run
on the folder stops with one line, writing nothing), the config dump, the device mesh, the
tokenizer, the model (`wrap` turns it into the trained module, e.g. PPO's policy with a value
head), the optimiser and the sharded `TrainState`, the checkpointer and the resume, and the ops
policy its programs are traced under (`compile`). `loop` runs a job's steps with everything around
them: metrics (each step logged once across a resume), the progress bar, the non-finite counter,
snapshots, checkpoints, SIGTERM, and the final model. A job is what differs between SFT and RL:

    job.unit                     "step" (SFT) or "update" (RL): the names in messages
    job.begin()                  before the first step of this call (RL: the evaluation of update 0)
    job.step(i) -> (row, finite) one step; `row` is logged (None: not this step); `finite` False
                                 counts towards `max_bad` non-finite steps in a row
    job.after(done)              after the step is logged, before its snapshot (periodic evaluations)
    job.extra_state() -> dict    the job's JSON part of each checkpoint (data iterator, rollouts, ...)
    job.finish()                 after the last step's checkpoint, before `final/` (final evaluations)
    job.postfix(row) -> dict     the progress bar's figures

The job restores its part from `run.extra` (the checkpoint's JSON, {} on a fresh start). Anchors:
tunix trains its RL actor with its SFT trainer (the algorithm supplies only its loss); MaxText's
run and its AOT compile call one step function (`learner.programs` here, used by `sftrl plan`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sftrl_jax import config as config_lib
from sftrl_jax import ops
from sftrl_jax import progress as progress_lib
from sftrl_jax.config import ConfigError
from sftrl_jax.data import processor
from sftrl_jax.errors import UserError
from sftrl_jax.models import lora as lora_lib
from sftrl_jax.parallel import distributed, placement
from sftrl_jax.parallel import mesh as mesh_lib
from sftrl_jax.train import checkpoint as ckpt_lib
from sftrl_jax.train import metrics as metrics_lib
from sftrl_jax.train import optim as optim_lib
from sftrl_jax.train import run_lock
from sftrl_jax.train.state import TrainState, abstract_like, load_model, rng_data, tokenizer_for


@dataclasses.dataclass(frozen=True)
class RunSection:
    """The `train:` keys every run has (SFT's `TrainSection` and RL's `RLTrainSection` add theirs)."""

    run_dir: str = "runs/run"
    seed: int = 0
    mesh: str = "data=1,fsdp=-1,tensor=1"  # -1 = the rest of the devices
    devices: int | None = None  # use only the first N devices (single-process runs); None = all
    save_every: int = 100  # steps (SFT) / updates (RL) between checkpoints
    keep: int = 3  # checkpoints kept
    resume: bool = True  # continue from the run folder's latest checkpoint
    tensorboard: bool = False
    # Weights & Biases beside the jsonl (pip install 'sftrl_jax[wandb]'): offline, in <run_dir>/wandb,
    # unless WANDB_API_KEY or WANDB_MODE is set; the run id is kept in <run_dir>/wandb_id.txt for resumes
    wandb: bool = False
    wandb_project: str = "sftrl"
    progress: bool = True  # a tqdm bar on a terminal, a line per interval in a log (sftrl_jax/progress.py)
    distributed: bool = False  # jax.distributed with cluster auto-detection (or set SFTRL_COORDINATOR, ...)
    d_init: int = 0  # tokens of the SFT that produced model.init (for the compute axis)
    async_checkpointing: bool = True
    # > 0: every N steps (never step 0) the model as <run_dir>/snapshots/<step>, a model checkpoint
    # like <run_dir>/final (`sftrl eval --ckpt`): a study's intermediate compute points; 0 = none
    snapshot_every: int = 0

    def __post_init__(self):
        if self.snapshot_every < 0:
            raise ConfigError(f"train.snapshot_every must be >= 0 (0 = no snapshots), got {self.snapshot_every}")
        if self.wandb and not self.wandb_project.strip():
            raise ConfigError(
                f"train.wandb_project must name a W&B project when train.wandb=true, got {self.wandb_project!r}"
            )
        config_lib.check_ranges(
            self, seed="[0, inf)", devices="[1, inf)", save_every="[1, inf)", keep="[1, inf)", d_init="[0, inf)"
        )


ADAPTER_DIR = "adapter"  # a LoRA run's final/ and snapshots: the adapters (PEFT format) beside the model
BASE_KEY = "lora_base"  # a LoRA run's checkpoints: the frozen base they were trained on


def base_identity(section, *, seed: int) -> dict[str, Any]:
    """What names a LoRA run's frozen base in its checkpoints: model.init's path and the sha256 of its
    weight files (one digest over them, sorted by name), or the preset and the seed it was drawn with."""
    if section.init is None:
        return {"preset": section.preset, "seed": int(seed)}
    import glob
    import hashlib

    from sftrl_jax.integrity import sha256_of

    files = sorted(glob.glob(os.path.join(section.init, "**", "*.safetensors"), recursive=True))
    files += sorted(glob.glob(os.path.join(section.init, "**", "*.npy"), recursive=True))  # orbax / ocdbt data
    digest = hashlib.sha256("".join(f"{os.path.relpath(f, section.init)}:{sha256_of(f)}\n" for f in files).encode())
    return {"init": os.path.abspath(section.init), "sha256": digest.hexdigest(), "files": len(files)}


class Run:
    """A training run's state and the loop around its steps (module docstring)."""

    def __init__(
        self,
        cfg,
        *,
        name: str,
        optim: optim_lib.OptimConfig,
        total_steps: int,
        wrap: Callable[[nnx.Module], nnx.Module] | None = None,
        exact: bool = False,
        check_mesh: Callable[[jax.sharding.Mesh], None] | None = None,
        rewind: tuple[str, ...] = (),
        reference: bool = False,
    ):
        """`cfg`: the run's config (its `model` and `train` sections; dumped to the run folder).
        `wrap(model)`: the trained module (default the model). `exact`: the RL passes' ops policy
        (bitwise-equal passes on one CPU device, `ops.policy_for`), compiled without CPU fusions
        when `train.exact_cpu_passes`. `check_mesh(mesh)`: the job's check of the mesh's shape.
        `rewind`: the run folder's other per-step files (RL: the evaluations), rewound on resume
        like the metrics. `reference`: keep a frozen copy of the starting parameters (model.init,
        before a resume replaces them) as `reference_params` (RL's KL penalty)."""
        self.cfg, self.name = cfg, name
        distributed.maybe_initialize(auto=cfg.train.distributed)
        self._lock = run_lock.acquire(cfg.train.run_dir)  # released by loop() or close()
        try:
            self._build(optim, total_steps, wrap, exact, check_mesh, rewind, reference)
        except BaseException:
            self._lock.release()
            raise

    def _build(self, optim, total_steps, wrap, exact, check_mesh, rewind, reference) -> None:
        cfg, t = self.cfg, self.cfg.train
        self.lead = jax.process_index() == 0  # the process that writes the run's files
        if t.wandb and self.lead:
            metrics_lib.require_wandb()  # before the model loads, not when the loop starts
        os.makedirs(t.run_dir, exist_ok=True)
        if self.lead:
            config_lib.dump_yaml(cfg, os.path.join(t.run_dir, "config.yaml"))
        devices = jax.devices() if t.devices is None else jax.devices()[: t.devices]
        self.mesh = mesh_lib.make_mesh(mesh_lib.parse_mesh_spec(t.mesh), devices=devices)
        if check_mesh is not None:
            check_mesh(self.mesh)
        self.tokenizer = tokenizer_for(cfg.model)
        model = load_model(cfg.model, mesh=self.mesh, seed=t.seed)  # not under set_mesh: eval_shape of names
        rows = model.config.text.num_embeddings  # Mllama: the output vocabulary + the <|image|> row
        if self.tokenizer.vocab_size > rows:
            raise ConfigError(
                f"the tokenizer has {self.tokenizer.vocab_size} ids but the model has {rows} embeddings: "
                f"give the model's tokenizer (model.tokenizer)"
            )
        self.image_processor = processor.for_model(model)
        self.lora = getattr(cfg, "lora", None)
        self.base_id = None
        if self.lora is not None and self.lora.enabled:  # the base frozen, adapters added (models/lora.py)
            self.base_id = base_identity(cfg.model, seed=t.seed)
            lora_lib.add(model, self.lora, seed=t.seed)
        self.graphdef, params, self.rest = nnx.split(wrap(model) if wrap else model, nnx.Param, ...)
        del model
        params = placement.on_mesh(params, self.mesh)
        trainable, frozen = lora_lib.partition(params)
        # the reference (RL's KL) shares a LoRA model's frozen base: only the trainable part is copied
        self.reference_params = lora_lib.combine(jax.tree.map(jnp.copy, trainable), frozen) if reference else None
        self.n_params = placement.param_count(params)
        self.n_trainable = placement.param_count(trainable)
        self.lr_fn = optim_lib.schedule(optim, total_steps)
        self.tx = optim_lib.make_optimizer(optim, trainable, total_steps=total_steps)
        with jax.set_mesh(self.mesh):
            opt_state = optim_lib.init_state(self.tx, trainable, self.mesh)
        state = TrainState(step=jnp.int32(0), params=params, opt_state=opt_state, rng=rng_data(t.seed))
        self.state = placement.on_mesh(state, self.mesh)
        self.checkpointer = ckpt_lib.Checkpointer(
            os.path.join(t.run_dir, "checkpoints"), keep=t.keep, every=t.save_every, async_save=t.async_checkpointing
        )
        self.step = 0  # steps (updates) done
        self.resumed: int | None = None  # the step of the checkpoint this run continues from
        self.extra: dict[str, Any] = {}  # the job's part of the restored checkpoint
        if t.resume and self.checkpointer.latest_step() is not None:
            step, saved, self.extra = self.checkpointer.restore_latest(abstract_like(self._saved(self.state)))
            self._check_base(self.extra.get(BASE_KEY))
            self.state = dataclasses.replace(saved, params=lora_lib.combine(saved.params, frozen))
            self.step = self.resumed = int(step)
        # each step logged once: rows after the checkpoint are logged again (metrics.rewind); so are
        # the evaluations after it
        metrics_lib.rewind(os.path.join(t.run_dir, self.metrics_file()), checkpoint_step=self.resumed)
        for name in rewind if self.resumed is not None and self.lead else ():
            metrics_lib.rewind(os.path.join(t.run_dir, name), checkpoint_step=self.resumed)
        self.state_shardings = jax.tree.map(lambda x: x.sharding, self.state)
        # RL: the training passes (update step, values / log-prob pass, reference pass) run their fp32
        # products on OpenBLAS on one CPU device, but not the causal-attention / RoPE kernels or fused
        # projections (`exact`): with those the update step's first log-probs were no longer bitwise
        # those of the passes that gave the ratio's old log-probs (tests/rl/test_rl_train.py's layout
        # tests: ratio 1 +- 2.4e-7). The passes are also compiled without YNNPACK fusions.
        self.ops_policy = ops.policy_for(self.mesh, exact=exact)
        self.compiler_options = (
            ops.exact_compiler_options(self.ops_policy, enabled=getattr(t, "exact_cpu_passes", True)) if exact else None
        )
        self.writer: metrics_lib.MetricsWriter | None = None  # open while `loop` runs

    # -- what jobs use ---------------------------------------------------------------------------

    def compile(self, fn, **jit_kwargs):
        """`fn` jitted as one of the run's programs (traced under `ops_policy`, with `compiler_options`)."""
        return jax.jit(ops.traced_with(fn, self.ops_policy), compiler_options=self.compiler_options, **jit_kwargs)

    def module(self, params=None) -> nnx.Module:
        """The trained module at `params` (default: the current ones; shares their arrays, no copy)."""
        return nnx.merge(self.graphdef, self.state.params if params is None else params, self.rest)

    def metrics_file(self) -> str:
        """metrics.jsonl (process 0; the others' copies as metrics.process<i>.jsonl)."""
        p = jax.process_index()
        return "metrics.jsonl" if p == 0 else f"metrics.process{p}.jsonl"

    def save_model(self, module: nnx.Module, path: str) -> str:
        """`module` as a model checkpoint at `path` (final, or a `train.snapshot_every` snapshot),
        with the run's tokenizer."""
        from sftrl_jax.models.checkpoint import save_checkpoint

        def extra(folder: str) -> None:
            self.tokenizer.hf.save_pretrained(folder)  # `sftrl eval --ckpt` / `model.init=` read it back
            if adapters:  # a LoRA run: its adapters in PEFT's format beside the merged model
                from sftrl_jax.models.convert import save_adapter

                save_adapter(adapters, os.path.join(folder, ADAPTER_DIR), base_model=(self.base_id or {}).get("init"))

        adapters = module if lora_lib.adapter_paths(module) else None
        if adapters is not None:  # the model is saved with the adapters folded into its weights
            module = lora_lib.merge(nnx.clone(module))
        save_checkpoint(module, path, extra=extra)
        return path

    def save(self, extra: dict[str, Any]) -> None:
        """The state at `step` as a checkpoint, unless the latest already is it."""
        if self.checkpointer.latest_step() != self.step:
            self.checkpointer.save(self.step, self._saved(self.state), self._extra(extra))

    def _saved(self, state: TrainState) -> TrainState:
        """What a checkpoint holds of `state`: a LoRA run's trainable parameters (its frozen base is
        `model.init`'s, named in the checkpoint by `base_identity`), every parameter otherwise."""
        return dataclasses.replace(state, params=lora_lib.partition(state.params)[0])

    def _extra(self, extra: dict[str, Any]) -> dict[str, Any]:
        return extra if self.base_id is None else {**extra, BASE_KEY: self.base_id}

    def _check_base(self, saved: dict[str, Any] | None) -> None:
        if self.base_id is None and saved is None:
            return
        if saved != self.base_id:
            raise ConfigError(
                f"{self.checkpointer.directory}: the checkpoint's adapters were trained on base {saved}, "
                f"this run's base is {self.base_id}: give the same model.init (and lora settings) or a new run_dir"
            )

    # -- the loop --------------------------------------------------------------------------------

    def loop(self, job, *, total: int, max_bad: int, final: Callable[[], nnx.Module], stop_after: int | None = None):
        """Runs `job`'s steps from `step` to `total` (module docstring), then the final checkpoint,
        `job.finish()` and `<run_dir>/final` (`final()`: the module to save). `stop_after` ends the
        loop after that many steps of this call without finishing the run (tests interrupt runs
        with it). Returns the last logged row. Closes the run (checkpoint writes, the lock)."""
        t, unit = self.cfg.train, job.unit
        if self.resumed is not None:
            print(f"{self.name}: resumed {t.run_dir} at {unit} {self.resumed}")
        self.writer = metrics_lib.MetricsWriter(
            t.run_dir,
            filename=self.metrics_file(),
            tensorboard=t.tensorboard and self.lead,
            wandb=t.wandb and self.lead,
            wandb_project=t.wandb_project,
            config=config_lib.to_dict(self.cfg),
        )
        bar = progress_lib.bar(
            total=total, initial=self.step, desc=self.name, unit=unit, enabled=t.progress and self.lead
        )
        last: dict[str, Any] = {}
        bad = done_now = 0
        try:
            with ckpt_lib.PreemptionGuard() as guard, jax.set_mesh(self.mesh):
                job.begin()
                while self.step < total:
                    row, finite = job.step(self.step)
                    self.step += 1
                    done_now += 1
                    bad = 0 if finite else bad + 1
                    if bad >= max_bad:
                        raise UserError(
                            f"{self.name}: {bad} {unit}s in a row had non-finite gradients; aborting (last "
                            f"checkpoint: {unit} {self.checkpointer.latest_step()})"
                        )
                    if row is not None:
                        last = self.writer.write(self.step, row, prefix="train")
                        if bar is not None:
                            bar.set_postfix(**job.postfix(row))
                    job.after(self.step)
                    # the snapshot before the checkpoint: a run resumed from the checkpoint has it
                    snapshot = ckpt_lib.snapshot_path(t.run_dir, self.step, every=t.snapshot_every)
                    if snapshot is not None:
                        self.save_model(final(), snapshot)
                    self.checkpointer.maybe_save(self.step, self._saved(self.state), self._extra(job.extra_state()))
                    self.checkpointer.check()  # a background save that failed stops the run now
                    if bar is not None:
                        bar.update(1)
                    if _any_process(guard.requested):
                        self.save(job.extra_state())
                        print(
                            f"{self.name}: SIGTERM received; saved {unit} {self.step} in {self.checkpointer.directory}; exiting"
                        )
                        return last
                    if stop_after is not None and done_now >= stop_after:
                        return last
                self.save(job.extra_state())
                last.update(job.finish() or {})
                self.checkpointer.wait()  # the last checkpoint is on disk before `final` says the run is done
                self.save_model(final(), os.path.join(t.run_dir, "final"))
        finally:
            try:
                self.close()
            finally:
                self.writer.close()
                if bar is not None:
                    bar.close()
        return last

    def close(self) -> None:
        """Waits for the checkpoint writes (SaveError if one failed) and releases the run folder."""
        try:
            self.checkpointer.close()
        finally:
            self._lock.release()


class AbstractRun:
    """A run without arrays, for `sftrl plan`: what `Run` gives a job's `programs` (graphdef, rest,
    optimiser, schedule, state shardings, `compile`), from `make()` (the trained module, built under
    `nnx.eval_shape`), with the state as `jax.ShapeDtypeStruct`s in the shardings `Run` gives it."""

    def __init__(self, make: Callable[[], nnx.Module], mesh, *, optim: optim_lib.OptimConfig, total_steps: int, policy):
        from sftrl_jax.parallel import rules

        self.mesh, self.ops_policy, self.compiler_options = mesh, policy, None
        self.graphdef, params, self.rest = nnx.split(nnx.eval_shape(make), nnx.Param, ...)
        shardings = rules.state_shardings(params, mesh)
        params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, shardings)
        self.lr_fn = optim_lib.schedule(optim, total_steps)
        trainable = lora_lib.partition(params)[0]  # a LoRA model's optimiser sees its adapters only
        self.tx = optim_lib.make_optimizer(optim, trainable, total_steps=total_steps)
        # the optimiser state as `optim.init_state` lays it out (moments sharded like their parameters)
        init = jax.jit(optim_lib.sharded_init(self.tx, trainable, mesh))
        with jax.set_mesh(mesh):
            out = init.lower(trainable).compile().output_shardings
        opt_state = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), jax.eval_shape(init, trainable), out
        )
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        self.state = TrainState(
            step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
            params=params,
            opt_state=opt_state,
            rng=jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated),
        )
        self.state_shardings = jax.tree.map(lambda x: x.sharding, self.state)

    compile = Run.compile
    module = Run.module


def _any_process(flag: bool) -> bool:
    """`flag` on any process (SIGTERM may reach the processes at different steps: all stop together)."""
    if jax.process_count() == 1:
        return flag
    return any(distributed.allgather_objects(bool(flag)))
