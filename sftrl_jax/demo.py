"""The end-to-end CPU demo: the whole study in miniature, in minutes, on a laptop-class CPU.

    sftrl demo                       # or: make demo
    sftrl demo --config configs/demo/cpu.yaml rl.updates=6

1. GP-L expert data from the environment (the paper's conversation format).
2. SFT warm-up of the shipped pretrained base (`sftrl_jax/data/assets/gp_l_base`, a 2.5M-parameter
   Llama pretrained on card arithmetic under many stated rules: `sftrl study`, docs/RESULTS.md) ->
   the Init checkpoint (`base=null`: a tiny Llama from scratch instead, the `model` section).
3. From Init, two arms with equal compute (the paper's FLOP accounting, SPEC.md §3.4):
   RL (PPO with a value head, multi-turn with verifier feedback) and more SFT on the same data.
4. Init, SFT and RL evaluated in distribution (J/Q/K = 10) and on the rule OOD split (J/Q/K =
   11/12/13), the table printed, the curves and a markdown report written.

The numbers are whatever the run gives: one seed of the small-scale study (`sftrl study` runs three
and the GRPO arm too), not the paper's 11B model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import time
from typing import Any

from sftrl_jax import config as config_lib
from sftrl_jax import study
from sftrl_jax.config import ConfigError
from sftrl_jax.study import PROMPT_LENGTHS, SHIPPED_BASE


@dataclasses.dataclass(frozen=True)
class DemoModel:
    text_overrides: dict[str, Any] = dataclasses.field(
        default_factory=lambda: dict(
            vocab_size=2048,
            hidden_size=128,
            intermediate_size=384,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=32,
            max_position_embeddings=2048,
        )
    )


@dataclasses.dataclass(frozen=True)
class DemoSFT:
    examples: int = 2000  # expert examples generated for SFT (warm-up and the SFT arm)
    dealt_order: bool = True  # expert formulas use the numbers in dealt order when they can (learnt sooner)
    revisions: float = 0.5  # fraction of two-turn examples (failed try, feedback, answer): Init can revise
    warmup_steps: int = 50  # SFT steps that make the Init checkpoint (from scratch: 400 at lr 3e-3)
    batch_size: int = 16
    lr: float = 5e-4
    arm_lr: float = 1e-4  # the SFT arm continues from Init with this lr

    def __post_init__(self):
        counts = ("examples", "warmup_steps", "batch_size")
        config_lib.check_ranges(
            self, revisions="[0, 1]", lr="[0, inf)", arm_lr="[0, inf)", **dict.fromkeys(counts, "[1, inf)")
        )


@dataclasses.dataclass(frozen=True)
class DemoRL:
    updates: int = 4
    num_envs: int = 16
    steps_per_update: int = 6  # one whole failed episode (5 graded turns + the truncation turn)
    samples_per_step: int = 32
    micro_batch: int = 16
    epochs: int = 1
    lr: float = 1e-4
    temperature: float = 0.7
    max_new_tokens: int = 64

    def __post_init__(self):
        counts = ("updates", "num_envs", "steps_per_update", "samples_per_step", "micro_batch", "epochs")
        config_lib.check_ranges(
            self,
            lr="[0, inf)",
            temperature="(0, inf)",  # RL scores log-probs at logits / temperature
            max_new_tokens="[1, inf)",
            **dict.fromkeys(counts, "[1, inf)"),
        )


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    run_dir: str = "runs/demo"
    task: str = "gp-l"
    base: str | None = SHIPPED_BASE  # null: the `model` section from scratch
    seed: int = 0
    eval_episodes: int = 100  # per split and checkpoint (the paper: 234; sftrl study uses 234)
    eval_splits: tuple[str, ...] = ("id", "ood-rule")
    # "short": a compact prompt (~90 tokens, envs/general_points/templates/gp_l_short.txt) with the
    # same cards, rule sentence, answer format and verifier; "paper": our full wording (~220 tokens).
    prompt: str = "short"
    model: DemoModel = dataclasses.field(default_factory=DemoModel)
    sft: DemoSFT = dataclasses.field(default_factory=DemoSFT)
    rl: DemoRL = dataclasses.field(default_factory=DemoRL)
    progress: bool = True

    def __post_init__(self):
        if self.task != "gp-l":
            raise ConfigError(f"the CPU demo runs gp-l (text); got task {self.task!r}")
        if self.prompt not in PROMPT_LENGTHS:
            raise ConfigError(f"prompt must be one of {', '.join(PROMPT_LENGTHS)}; got {self.prompt!r}")
        config_lib.check_ranges(self, seed="[0, inf)", eval_episodes="[1, inf)")
        study.check_eval_splits(self.task, self.eval_splits)

    def env_options(self) -> dict[str, Any]:
        """Environment keywords shared by data generation, RL and evaluation (the prompt wording)."""
        from sftrl_jax.envs.general_points import prompts

        return prompts.template_options(self.prompt)


def _sft_config(
    cfg: DemoConfig,
    *,
    run_dir: str,
    data: str,
    steps: int,
    lr: float,
    init: str | None,
    d_init: int,
    schedule: str = "cosine",
):
    from sftrl_jax.data.sft import SFTDataConfig
    from sftrl_jax.sft.train import SFTConfig, TrainSection
    from sftrl_jax.train.optim import OptimConfig
    from sftrl_jax.train.state import ModelSection

    model = (
        ModelSection(init=init)
        if init
        else ModelSection(preset="llama-tiny", text_overrides=dict(cfg.model.text_overrides))
    )
    scratch = init is None
    return SFTConfig(
        model=model,
        data=SFTDataConfig(
            train_files=(data,),
            max_length=PROMPT_LENGTHS[cfg.prompt][0][-1],
            buckets=PROMPT_LENGTHS[cfg.prompt][0],
            batch_size=cfg.sft.batch_size,
            seed=cfg.seed,
        ),
        optim=OptimConfig(
            lr=lr, schedule=schedule, warmup_ratio=0.05 if scratch else 0.0, weight_decay=0.0, grad_clip=1.0
        ),
        train=TrainSection(
            run_dir=run_dir,
            steps=max(steps, 1),
            log_every=10,
            save_every=max(steps, 1),
            keep=1,
            seed=cfg.seed,
            progress=cfg.progress,
            devices=1,
            d_init=d_init,
            resume=False,
        ),
    )


def _rl_config(cfg: DemoConfig, *, run_dir: str, init: str, d_init: int):
    from sftrl_jax.rl.config import EnvSection, EvalSection, RLConfig, RLTrainSection
    from sftrl_jax.rl.ppo import PPOConfig
    from sftrl_jax.sampling.policy import SamplingSection
    from sftrl_jax.train.optim import OptimConfig
    from sftrl_jax.train.state import ModelSection

    r = cfg.rl
    return RLConfig(
        model=ModelSection(init=init),
        algo="ppo",
        env=EnvSection(task=cfg.task, split="train", num_envs=r.num_envs, options=cfg.env_options()),
        sampling=SamplingSection(max_new_tokens=r.max_new_tokens, temperature=r.temperature),
        ppo=PPOConfig(epochs=r.epochs, samples_per_step=r.samples_per_step, micro_batch=r.micro_batch),
        optim=OptimConfig(lr=r.lr, eps=1e-7, grad_clip=1.0, warmup_ratio=0.0, schedule="constant"),
        eval=EvalSection(every=0, splits=()),
        train=RLTrainSection(
            run_dir=run_dir,
            updates=r.updates,
            steps_per_update=r.steps_per_update,
            length_buckets=PROMPT_LENGTHS[cfg.prompt][1],
            seed=cfg.seed,
            devices=1,
            save_every=r.updates,
            keep=1,
            progress=cfg.progress,
            d_init=d_init,
            resume=False,
        ),
    )


def _evaluate(cfg: DemoConfig, ckpt: str, run_dirs: tuple[str, ...], arm: str, step: int, gflops: float) -> None:
    """Greedy evaluation of `ckpt` on every split (outputs under the first run folder); its rows are
    appended to each of `run_dirs`."""
    from sftrl_jax.evaluation import evaluate as ev
    from sftrl_jax.evaluation import report
    from sftrl_jax.sampling.policy import SamplingSection, make_policy
    from sftrl_jax.train.state import load_for_eval

    model, tokenizer, proc = load_for_eval(ckpt, cfg.task)
    policy = make_policy(
        model,
        tokenizer,
        SamplingSection(max_new_tokens=cfg.rl.max_new_tokens),
        seed=cfg.seed,
        image_processor=proc,
        temperature=0.0,
    )
    for split in cfg.eval_splits:
        proto = ev.protocol(cfg.task, split, n_episodes=cfg.eval_episodes)
        summary = ev.evaluate(
            policy,
            tokenizer,
            proto,
            batch_size=32,
            progress=cfg.progress,
            out_dir=os.path.join(run_dirs[0], "eval", arm, split),
            env_options=cfg.env_options(),
        )
        for run_dir in run_dirs:
            report.append_eval(run_dir, arm=arm, step=step, gflops=gflops, summary=summary)


def _last(run_dir: str, key: str) -> float:
    from sftrl_jax.train.metrics import read_jsonl

    rows = [r for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if key in r]
    return float(rows[-1][key]) if rows else 0.0


def run(cfg: DemoConfig) -> dict[str, Any]:
    from sftrl_jax.data.generate import generate_gp_sft
    from sftrl_jax.evaluation import report
    from sftrl_jax.rl.train import Trainer
    from sftrl_jax.sft.train import train as sft_train

    t_start = time.time()
    timings: dict[str, float] = {}
    os.makedirs(cfg.run_dir, exist_ok=True)
    config_lib.dump_yaml(cfg, os.path.join(cfg.run_dir, "demo_config.yaml"))

    def stage(name: str):
        timings[name] = time.time()
        print(f"\n== {name} ({time.time() - t_start:.0f} s) ==", flush=True)

    stage("1/5 data")
    data = os.path.join(cfg.run_dir, "data", "gp_l_train.json")
    generate_gp_sft(
        cfg.task,
        "train",
        cfg.sft.examples,
        data,
        seed=cfg.seed,
        dealt_order=cfg.sft.dealt_order,
        revisions=cfg.sft.revisions,
        env_options=cfg.env_options(),
    )

    stage("2/5 SFT warm-up -> Init")
    init_dir = os.path.join(cfg.run_dir, "init")
    if cfg.base and not os.path.isdir(cfg.base):
        raise ConfigError(f"base {cfg.base!r} is not a model folder (base=null trains a tiny model from scratch)")
    sft_train(
        _sft_config(
            cfg, run_dir=init_dir, data=data, steps=cfg.sft.warmup_steps, lr=cfg.sft.lr, init=cfg.base or None, d_init=0
        )
    )
    init_ckpt = os.path.join(init_dir, "final")
    n_params = _n_params(init_ckpt)
    init_gflops = _last(init_dir, "train/gflops")
    d_init = int(round(init_gflops * 1e9 / (6 * n_params)))  # the warm-up's tokens (X = 6 N D)

    stage("3/5 RL arm (PPO)")
    rl_dir = os.path.join(cfg.run_dir, "rl")
    trainer = Trainer(_rl_config(cfg, run_dir=rl_dir, init=init_ckpt, d_init=d_init))
    trainer.run()
    rl_gflops = trainer.compute.flops(rl=True) / 1e9

    stage("4/5 SFT arm with the same compute")
    # X_SFT = 6N(D_init + D_SFT) = X_RL  =>  the arm spends rl_gflops - init_gflops.
    arm_steps = max(1, int(round((rl_gflops - init_gflops) / _gflops_per_step(init_dir))))
    sft_dir = os.path.join(cfg.run_dir, "sft")
    sft_train(
        _sft_config(
            cfg,
            run_dir=sft_dir,
            data=data,
            steps=arm_steps,
            lr=cfg.sft.arm_lr,
            init=init_ckpt,
            d_init=d_init,
            schedule="constant",  # as the study's SFT arm
        )
    )
    sft_gflops = _last(sft_dir, "train/gflops")

    stage("5/5 evaluation (greedy)")
    # Init is evaluated once; its rows go into both arms' folders so each plots from Init.
    _evaluate(cfg, init_ckpt, (rl_dir, sft_dir), "init", 0, init_gflops)
    _evaluate(cfg, os.path.join(rl_dir, "final"), (rl_dir,), "rl", cfg.rl.updates, rl_gflops)
    _evaluate(cfg, os.path.join(sft_dir, "final"), (sft_dir,), "sft", arm_steps, sft_gflops)
    paths = report.report([sft_dir, rl_dir], os.path.join(cfg.run_dir, "report"))
    table = report.table(report.load_rows([sft_dir, rl_dir]))
    elapsed = time.time() - t_start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    summary = {
        "seconds": round(elapsed, 1),
        "peak_rss_mb": round(peak_mb),
        "n_params": n_params,
        "gflops": {"init": init_gflops, "rl": rl_gflops, "sft": sft_gflops},
        "sft_arm_steps": arm_steps,
        "stage_seconds": _durations(timings, t_start + elapsed),
        "report": paths,
    }
    with open(os.path.join(cfg.run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print("\n" + table)
    print(
        f"compute (GFLOPs): Init {init_gflops:.1f}, RL {rl_gflops:.1f}, SFT {sft_gflops:.1f} "
        f"(SFT arm: {arm_steps} steps to match RL)"
    )
    print(
        f"demo finished in {elapsed / 60:.1f} min, peak memory {peak_mb:.0f} MB; report: {paths['markdown']}, "
        f"plot: {paths['plot']}"
    )
    return summary


def _n_params(ckpt: str) -> int:
    from sftrl_jax.models import param_count
    from sftrl_jax.models.checkpoint import read_checkpoint_config

    config, _ = read_checkpoint_config(ckpt)
    return int(param_count(config))


def _gflops_per_step(run_dir: str) -> float:
    """Average GFLOPs of one SFT step of a run (from its metrics)."""
    from sftrl_jax.train.metrics import read_jsonl

    rows = [r for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if "train/gflops" in r]
    return rows[-1]["train/gflops"] / rows[-1]["step"]


def _durations(marks: dict[str, float], end: float) -> dict[str, float]:
    names = list(marks)
    times = [marks[n] for n in names] + [end]
    return {n: round(times[i + 1] - times[i], 1) for i, n in enumerate(names)}
