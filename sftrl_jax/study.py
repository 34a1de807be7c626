"""The study at small scale: a pretrained small base, then the paper's protocol on it.

    sftrl study --config configs/study/gp_l_small.yaml
    sftrl report runs/study/gp_l_small           # report.md, curves.png, kl.png
    sftrl demo                                   # configs/demo/cpu.yaml: one seed, fewer hands, on a CPU

1. Base: `base` (a model folder, default the shipped one, `sftrl_jax/data/assets/gp_l_base`) or,
   with `base: null`, pretraining here: the corpus of `sftrl_jax/data/pretrain.py` (card arithmetic
   under many stated J/Q/K rules and targets, its own wording, never the rule-OOD rule) and
   `sftrl sft --config <pretrain_config>`, then its second stage on the composed wording
   (`composed_config`, configs/study/pretrain_composed.yaml; null skips it). The base is probed once on
   its own wording (greedy, one turn, through the evaluation code: `evaluation/prompt_set.py`): the ID
   rule (J/Q/K = 10) and the held-out rule (11/12/13), target 24 -> `base.json` (`probe_episodes: 0`
   skips it).
2. Per seed of the post-training (`seeds`): GP-L expert data of that seed (the post-training
   template, ID rule), a short SFT warm-up from the base -> Init; from Init three arms: PPO (the
   paper's RL, arm "rl"), GRPO (arm "grpo") and more SFT on the same expert data (arm "sft") with the
   PPO arm's compute (the paper's FLOP accounting, SPEC.md §3.4). Each arm writes a snapshot at
   `points` evenly spaced compute points.
3. Every checkpoint (Init and each snapshot) is evaluated with the paper's protocol on ID and
   rule-OOD (`eval_episodes` hands, 234 = the paper's, the same hands for every checkpoint; 5 graded
   tries with feedback; greedy) and its KL to Init is measured on `kl_prompts` first-turn prompts per
   split dealt from other seeds than the evaluation's (`evaluation/kl.py`).

Outputs in `run_dir`: `study.json`, `base.json`, `evals.jsonl` (report rows + "seed"), `kl.jsonl`,
`seed<k>/` (data, init, rl, grpo, sft run folders and evaluation files), `report/`. Resume: every
finished stage is kept (a run folder's complete `final`, written atomically; the evaluation and KL
rows already written) and skipped when the command runs again; an interrupted training stage (a
`final` missing or incomplete) resumes from its checkpoint and writes `final` again. The study's
folder and each stage's run folder are locked while in use (`train/run_lock.py`).
The design was fixed before any evaluation number was looked at (docs/RESULTS.md states it).

The CPU demo (`sftrl demo`) is this study on configs/demo/cpu.yaml: one seed, the PPO and SFT arms, one
compute point each, 100 hands per split, no base probe; it ends with `final_tables`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import time
from typing import Any

from sftrl_jax import config as config_lib
from sftrl_jax.config import ConfigError
from sftrl_jax.errors import UserError

SHIPPED_BASE = os.path.join(os.path.dirname(__file__), "data", "assets", "gp_l_base")
KL_SEED = 777  # the KL prompt set's deal seed (the evaluation uses 42)
ARM_NAMES = ("rl", "grpo", "sft")


@dataclasses.dataclass(frozen=True)
class WarmupSection:
    examples: int = 2000  # expert examples of the post-training data (warm-up and the SFT arm)
    revisions: float = 0.5  # fraction of two-turn examples (failed try, feedback, answer)
    steps: int = 50  # chosen among 25 / 50 / 100 on seed-99 validation hands (docs/RESULTS.md)
    batch_size: int = 16
    lr: float = 5e-4
    # The fraction of warm-up examples under another J/Q/K rule (`generate_gp_sft(diverse_rules=)`: any
    # values but the rule-OOD split's, stated in the template's rule sentence), so that Init reads the rule
    # the prompt states; 0 = the warm-up on the arms' ID data. The arms' data stays ID-only either way.
    diverse_rules: float = 0.0

    def __post_init__(self):
        config_lib.check_ranges(
            self,
            examples="[1, inf)",
            revisions="[0, 1]",
            steps="[1, inf)",
            batch_size="[1, inf)",
            lr="[0, inf)",
            diverse_rules="[0, 1]",
        )


@dataclasses.dataclass(frozen=True)
class ArmsSection:
    arms: tuple[str, ...] = ARM_NAMES
    points: int = 2  # snapshots per arm, evenly spaced in updates / steps (the last is the arm's end)
    updates: int = 8  # PPO and GRPO updates
    num_envs: int = 16
    steps_per_update: int = 6  # PPO: lock-step turns per env per update
    prompts_per_update: int = 4  # GRPO: groups per update (x group_size episodes)
    group_size: int = 4
    samples_per_step: int = 32
    micro_batch: int = 16
    epochs: int = 1
    rl_lr: float = 1e-4
    temperature: float = 0.7
    max_new_tokens: int = 64
    sft_lr: float = 1e-4  # the SFT arm's lr (constant), from Init

    def __post_init__(self):
        counts = ("points", "updates", "num_envs", "steps_per_update", "prompts_per_update", "samples_per_step")
        config_lib.check_ranges(
            self,
            **dict.fromkeys((*counts, "micro_batch", "epochs", "max_new_tokens"), "[1, inf)"),
            group_size="[2, inf)",  # GRPO's advantages are relative to the group
            rl_lr="[0, inf)",
            sft_lr="[0, inf)",
            temperature="(0, inf)",  # RL scores log-probs at logits / temperature
        )
        bad = sorted(set(self.arms) - set(ARM_NAMES))
        if bad or not self.arms:
            raise ConfigError(f"arms.arms must be a non-empty subset of {', '.join(ARM_NAMES)}; got {list(self.arms)}")
        if self.points < 1 or self.updates % self.points:
            raise ConfigError(f"arms.points ({self.points}) must be >= 1 and divide arms.updates ({self.updates})")


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    run_dir: str = "runs/study/gp_l_small"
    task: str = "gp-l"
    base: str | None = SHIPPED_BASE  # a model folder; null = pretrain it here (pretrain_config)
    pretrain_config: str = "configs/study/pretrain.yaml"
    pretrain_examples: int = 96000
    # the base's second stage (composed wording) on the first stage's model; null = one stage
    composed_config: str | None = "configs/study/pretrain_composed.yaml"
    composed_examples: int = 30000
    probe_episodes: int = 234  # base probe prompts per rule (pretraining wording); 0: no probe
    seeds: tuple[int, ...] = (0, 1, 2)
    eval_episodes: int = 234
    eval_splits: tuple[str, ...] = ("id", "ood-rule")
    eval_batch: int = 64
    kl_prompts: int = 64
    prompt: str = "short"  # the post-training template: "short" (templates/gp_l_short.txt) or "paper"
    warmup: WarmupSection = dataclasses.field(default_factory=WarmupSection)
    arms: ArmsSection = dataclasses.field(default_factory=ArmsSection)
    progress: bool = True

    def __post_init__(self):
        if self.task != "gp-l":
            raise ConfigError(f"the small-scale study runs gp-l (text); got task {self.task!r}")
        if self.prompt not in PROMPT_LENGTHS:
            raise ConfigError(f"prompt must be one of {', '.join(PROMPT_LENGTHS)}; got {self.prompt!r}")
        if not self.seeds:
            raise ConfigError("seeds must name at least one seed")
        counts = ("pretrain_examples", "composed_examples", "eval_episodes", "eval_batch", "kl_prompts")
        config_lib.check_ranges(self, seeds="[0, inf)", probe_episodes="[0, inf)", **dict.fromkeys(counts, "[1, inf)"))
        check_eval_splits(self.task, self.eval_splits)
        # The RL arms' run configs now, not after the base and the warm-up: a batch layout the
        # learner refuses (envs x steps per update not a multiple of samples_per_step) stops here.
        for algo, arm in RL_ARMS:
            if arm in self.arms.arms:
                try:
                    _rl_cfg(self, algo=algo, run_dir=self.run_dir, init=self.run_dir, seed=self.seeds[0], d_init=0)
                except ConfigError as e:
                    raise ConfigError(f"arms: the {arm} arm's RL run ({algo}): {e}") from None

    def env_options(self) -> dict[str, Any]:
        from sftrl_jax.envs.general_points import prompts

        return prompts.template_options(self.prompt)


def check_eval_splits(task: str, splits) -> None:
    """Each of `splits` an evaluation split of `task` (refused at config time, not after training)."""
    from sftrl_jax.evaluation import evaluate

    for split in splits:
        try:
            evaluate.protocol(task, split)
        except UserError as e:
            raise ConfigError(f"eval_splits: {split!r}: {e}") from None


RL_ARMS = (("ppo", "rl"), ("grpo", "grpo"))  # (algorithm, arm name)

# Padded lengths per post-training wording: (SFT buckets, RL training buckets).
PROMPT_LENGTHS = {"short": ((160, 192, 256), (384, 768)), "paper": ((288, 320, 448), (384, 768))}


class _Ledger:
    """The evaluation / KL rows already written (resume skips them)."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.done: set[tuple] = set()
        for name, kind in (("evals.jsonl", "eval"), ("kl.jsonl", "kl")):
            path = os.path.join(run_dir, name)
            if os.path.exists(path):
                with open(path) as f:
                    for line in f:
                        if line.strip():
                            r = json.loads(line)
                            self.done.add((kind, r["seed"], r["arm"], r["step"], r["split"]))

    def has(self, *key) -> bool:
        return tuple(key) in self.done

    def write(self, kind: str, *rows: dict[str, Any]) -> None:
        """Appends `rows` (one point's rows: its metrics) in one write, so a kill keeps all or none."""
        with open(os.path.join(self.run_dir, f"{'evals' if kind == 'eval' else 'kl'}.jsonl"), "a") as f:
            f.write("".join(json.dumps(row) + "\n" for row in rows))
        for row in rows:
            self.done.add((kind, row["seed"], row["arm"], row["step"], row["split"]))


def _sft_cfg(cfg: StudyConfig, *, run_dir, data, steps, lr, init, seed, d_init, snapshot_every=0, schedule="cosine"):
    from sftrl_jax.data.sft import SFTDataConfig
    from sftrl_jax.sft.train import SFTConfig, TrainSection
    from sftrl_jax.train.optim import OptimConfig
    from sftrl_jax.train.state import ModelSection

    buckets = PROMPT_LENGTHS[cfg.prompt][0]
    return SFTConfig(
        model=ModelSection(init=init),
        data=SFTDataConfig(
            train_files=(data,), max_length=buckets[-1], buckets=buckets, batch_size=cfg.warmup.batch_size, seed=seed
        ),
        optim=OptimConfig(lr=lr, schedule=schedule, warmup_ratio=0.0, weight_decay=0.0, grad_clip=1.0),
        train=TrainSection(
            run_dir=run_dir,
            steps=max(int(steps), 1),
            log_every=1,
            save_every=max(int(steps), 1),
            keep=1,
            seed=seed,
            progress=cfg.progress,
            devices=1,
            d_init=d_init,
            snapshot_every=snapshot_every,
        ),
    )


def _rl_cfg(cfg: StudyConfig, *, algo: str, run_dir: str, init: str, seed: int, d_init: int):
    from sftrl_jax.rl.config import EnvSection, EvalSection, RLConfig, RLTrainSection
    from sftrl_jax.rl.grpo import GRPOConfig
    from sftrl_jax.rl.ppo import PPOConfig
    from sftrl_jax.sampling.policy import SamplingSection
    from sftrl_jax.train.optim import OptimConfig
    from sftrl_jax.train.state import ModelSection

    a = cfg.arms
    return RLConfig(
        model=ModelSection(init=init),
        algo=algo,
        env=EnvSection(task=cfg.task, split="train", num_envs=a.num_envs, options=cfg.env_options()),
        sampling=SamplingSection(max_new_tokens=a.max_new_tokens, temperature=a.temperature),
        ppo=PPOConfig(epochs=a.epochs, samples_per_step=a.samples_per_step, micro_batch=a.micro_batch),
        grpo=GRPOConfig(
            group_size=a.group_size, epochs=a.epochs, samples_per_step=a.samples_per_step, micro_batch=a.micro_batch
        ),
        optim=OptimConfig(lr=a.rl_lr, eps=1e-7, grad_clip=1.0, warmup_ratio=0.0, schedule="constant"),
        eval=EvalSection(every=0, splits=()),
        train=RLTrainSection(
            run_dir=run_dir,
            updates=a.updates,
            steps_per_update=a.steps_per_update,
            prompts_per_update=a.prompts_per_update,
            length_buckets=PROMPT_LENGTHS[cfg.prompt][1],
            seed=seed,
            devices=1,
            save_every=1,
            keep=1,
            progress=cfg.progress,
            d_init=d_init,
            snapshot_every=a.updates // a.points,
        ),
    )


def _metric_at(run_dir: str, step: int, key: str = "train/gflops") -> float:
    from sftrl_jax.train.metrics import read_jsonl

    rows = [r for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if key in r and r["step"] <= step]
    if not rows:
        raise ConfigError(f"{run_dir}/metrics.jsonl has no {key} at or before step {step}")
    return float(max(rows, key=lambda r: r["step"])[key])


def _n_params(ckpt: str) -> int:
    from sftrl_jax.models import param_count
    from sftrl_jax.train.state import ModelSection, load_model

    return int(param_count(load_model(ModelSection(init=ckpt)).config))


class _Models:
    """One loaded model per checkpoint path (the KL pass needs Init beside every snapshot)."""

    def __init__(self, task: str):
        self.task, self.cache = task, {}

    def get(self, ckpt: str):
        from sftrl_jax.train.state import load_for_eval

        if ckpt not in self.cache:
            if len(self.cache) > 4:
                self.cache.pop(next(iter(self.cache)))
            self.cache[ckpt] = load_for_eval(ckpt, self.task)
        return self.cache[ckpt]


def kl_prompts(cfg: StudyConfig, tokenizer, split: str) -> list[list[int]]:
    """First-turn prompts of `kl_prompts` hands of `split`, dealt with seeds the evaluation never uses."""
    from sftrl_jax import envs

    env = envs.make(cfg.task, split=split, **cfg.env_options())
    out = []
    for i in range(cfg.kl_prompts):
        obs, _ = env.reset(seed=KL_SEED * 1_000_003 + i)
        out.append(tokenizer.chat_ids([{"role": "user", "content": obs["text"]}], add_generation_prompt=True))
    return out


def _greedy(model, tokenizer, cfg: StudyConfig, *, seed: int, image_processor=None):
    """The evaluation's policy: greedy, the arms' answer budget."""
    from sftrl_jax.sampling.policy import SamplingSection, make_policy

    section = SamplingSection(max_new_tokens=cfg.arms.max_new_tokens)
    return make_policy(model, tokenizer, section, seed=seed, image_processor=image_processor, temperature=0.0)


def probe_base(cfg: StudyConfig, base: str) -> dict[str, Any]:
    """Greedy one-turn success of the base on its own wording: the ID rule and the held-out rule."""
    from sftrl_jax.data import pretrain
    from sftrl_jax.evaluation import prompt_set
    from sftrl_jax.train.state import load_for_eval

    model, tokenizer, _ = load_for_eval(base, cfg.task)
    policy = _greedy(model, tokenizer, cfg, seed=0)
    out = {}
    for name, rule in (("id_rule", (10, 10, 10)), ("held_out_rule", pretrain.HELD_OUT_RULE)):
        items = pretrain.probe(cfg.probe_episodes, rule=rule)
        r = prompt_set.evaluate(policy, tokenizer, items, name=name, batch_size=cfg.eval_batch, progress=cfg.progress)
        out[name] = dict(success=r["success_rate"], stderr=r["success_rate_stderr"], n=r["episodes"], rule=list(rule))
    return out


def run(cfg: StudyConfig) -> dict[str, Any]:
    from sftrl_jax.train import run_lock

    with run_lock.acquire(cfg.run_dir):  # one study per folder (each stage's run folder has its own lock)
        return _run(cfg)


def _run(cfg: StudyConfig) -> dict[str, Any]:
    from sftrl_jax.data.generate import generate_gp_sft
    from sftrl_jax.data.pretrain import generate_pretrain
    from sftrl_jax.models.checkpoint import is_checkpoint
    from sftrl_jax.sft.train import SFTConfig
    from sftrl_jax.sft.train import train as sft_train

    t0 = time.time()
    os.makedirs(cfg.run_dir, exist_ok=True)
    config_lib.dump_yaml(cfg, os.path.join(cfg.run_dir, "study_config.yaml"))

    def stage(text: str) -> None:
        print(f"\n== {text} ({(time.time() - t0) / 60:.1f} min) ==", flush=True)

    base = cfg.base
    if not base:
        stages = [("pretrain", cfg.pretrain_config, cfg.pretrain_examples, "own")]
        if cfg.composed_config:
            stages.append(("pretrain_composed", cfg.composed_config, cfg.composed_examples, "composed"))
        init = None
        for name, config_path, n, wording in stages:
            stage(f"pretraining the base: {name}")
            pre_dir = os.path.join(cfg.run_dir, name)
            base = os.path.join(pre_dir, "final")
            if not is_checkpoint(base):  # done = a complete `final` (written atomically)
                corpus = os.path.join(pre_dir, "data", f"{name}.json")
                if not os.path.exists(corpus):
                    print(json.dumps(generate_pretrain(n, corpus, seed=0, wording=wording)))
                overrides = [
                    f"train.run_dir={pre_dir}",
                    f"data.train_files=[{corpus}]",
                    f"train.progress={str(cfg.progress).lower()}",
                ]
                sft_train(config_lib.load(SFTConfig, config_path, overrides + ([f"model.init={init}"] if init else [])))
            init = base
    elif not os.path.isdir(base):
        raise ConfigError(f"base {base!r} is not a model folder (base: null pretrains one with pretrain_config)")
    with open(os.path.join(cfg.run_dir, "study.json"), "w") as f:
        json.dump({"task": cfg.task, "seeds": list(cfg.seeds), "base": base, "arms": list(cfg.arms.arms)}, f, indent=2)
    base_json = os.path.join(cfg.run_dir, "base.json")
    if cfg.probe_episodes and not os.path.exists(base_json):
        stage("probing the base on its own wording")
        probe = probe_base(cfg, base)
        with open(base_json, "w") as f:
            json.dump({"base": base, "probe": probe}, f, indent=2)
        print(json.dumps(probe))

    ledger = _Ledger(cfg.run_dir)
    models = _Models(cfg.task)
    n_params = _n_params(base)
    for seed in cfg.seeds:
        sdir = os.path.join(cfg.run_dir, f"seed{seed}")
        data = os.path.join(sdir, "data", "gp_l_train.json")
        warmup_data = data if not cfg.warmup.diverse_rules else os.path.join(sdir, "data_warmup", "gp_l_train.json")
        for path, diverse in ((data, 0.0), (warmup_data, cfg.warmup.diverse_rules)):
            if not os.path.exists(path):
                stage(f"seed {seed}: expert data" + (f" (warm-up, {diverse:g} under other rules)" if diverse else ""))
                generate_gp_sft(
                    cfg.task,
                    "train",
                    cfg.warmup.examples,
                    path,
                    seed=seed,
                    dealt_order=True,
                    revisions=cfg.warmup.revisions,
                    env_options=cfg.env_options(),
                    diverse_rules=diverse,
                )
        init_dir = os.path.join(sdir, "init")
        init = os.path.join(init_dir, "final")
        if not is_checkpoint(init):
            stage(f"seed {seed}: SFT warm-up from the base -> Init")
            sft_train(
                _sft_cfg(
                    cfg,
                    run_dir=init_dir,
                    data=warmup_data,
                    steps=cfg.warmup.steps,
                    lr=cfg.warmup.lr,
                    init=base,
                    seed=seed,
                    d_init=0,
                )
            )
        init_gflops = _metric_at(init_dir, cfg.warmup.steps)
        d_init = int(round(init_gflops * 1e9 / (6 * n_params)))
        points = [("init", 0, init, init_gflops)]
        for algo, arm in RL_ARMS:
            if arm not in cfg.arms.arms:
                continue
            arm_dir = os.path.join(sdir, arm)
            if not is_checkpoint(os.path.join(arm_dir, "final")):
                stage(f"seed {seed}: {arm} arm ({algo})")
                from sftrl_jax.rl.train import Trainer

                Trainer(_rl_cfg(cfg, algo=algo, run_dir=arm_dir, init=init, seed=seed, d_init=d_init)).run()
            every = cfg.arms.updates // cfg.arms.points
            for k in range(every, cfg.arms.updates + 1, every):
                points.append((arm, k, os.path.join(arm_dir, "snapshots", str(k)), _metric_at(arm_dir, k)))
        if "sft" in cfg.arms.arms:
            sft_dir = os.path.join(sdir, "sft")
            ref_arm = _reference_arm(cfg)
            target = max((g for a, _, _, g in points if a == ref_arm), default=init_gflops * 2)
            per_step = init_gflops / cfg.warmup.steps
            steps = max(cfg.arms.points, int(round((target - init_gflops) / per_step)))
            steps -= steps % cfg.arms.points
            if not is_checkpoint(os.path.join(sft_dir, "final")):
                stage(f"seed {seed}: SFT arm ({steps} steps, the {ref_arm} arm's compute)")
                sft_train(
                    _sft_cfg(
                        cfg,
                        run_dir=sft_dir,
                        data=data,
                        steps=steps,
                        lr=cfg.arms.sft_lr,
                        init=init,
                        seed=seed,
                        d_init=d_init,
                        snapshot_every=steps // cfg.arms.points,
                        schedule="constant",
                    )
                )
            every = steps // cfg.arms.points
            for k in range(every, steps + 1, every):
                points.append(("sft", k, os.path.join(sft_dir, "snapshots", str(k)), _metric_at(sft_dir, k)))
        _evaluate_points(cfg, seed, sdir, points, init, ledger, models, stage)
    stage("report")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    out: dict[str, Any] = {"minutes": round((time.time() - t0) / 60, 1), "peak_rss_mb": round(peak_mb)}
    try:
        from sftrl_jax.evaluation import study_report

        out.update(study_report.report(cfg.run_dir, os.path.join(cfg.run_dir, "report")))
        with open(out["markdown"]) as f:
            print(f.read())
    except ImportError:  # pragma: no cover - report module missing
        pass
    print(f"study finished in {out['minutes']} min, peak memory {out['peak_rss_mb']} MB: {cfg.run_dir}")
    return out


def final_tables(cfg: StudyConfig) -> str:
    """Per seed: Init and each arm's last point on every split (`report.table`, with the change from Init
    and the reward per turn), then each arm's compute; what `sftrl demo` ends with."""
    from sftrl_jax.evaluation import report

    rows = report.load_rows([cfg.run_dir])  # the study's evals.jsonl
    order, titles = ("init", *ARM_NAMES), {"init": "Init", "rl": "RL", "grpo": "GRPO", "sft": "SFT"}  # as the table
    out = []
    for seed in cfg.seeds:
        mine = [r for r in rows if r["seed"] == seed]
        last = {}  # arm -> its last evaluated point
        for r in sorted(mine, key=lambda r: (order.index(r["arm"]), r["gflops"])):
            last[r["arm"]] = r
        compute = ", ".join(f"{titles[arm]} {r['gflops']:.1f}" for arm, r in last.items())
        if "sft" in last:
            compute += f" (SFT arm: {last['sft']['step']} steps to match {titles[_reference_arm(cfg)]})"
        out += [f"seed {seed}:"] if len(cfg.seeds) > 1 else []
        out += [report.table(mine), f"compute (GFLOPs): {compute}\n"]
    return "\n".join(out)


def _reference_arm(cfg: StudyConfig) -> str:
    """The arm whose compute the SFT arm matches: X_SFT = X_RL at the PPO arm's end (GRPO's without PPO)."""
    return "rl" if "rl" in cfg.arms.arms else "grpo"


def rule_use_row(row: dict[str, Any], proto, out_dir: str, cfg: StudyConfig) -> dict[str, Any]:
    """The study's primary endpoint beside an evaluation row: the share of first answers whose "number"
    field is the split's card values under the prompt's rule (`evaluation.failures.rule_use`; on ID the
    numbers right), with its binomial standard error; `as_10` = J/Q/K written as 10 where that differs."""
    import math

    from sftrl_jax.evaluation import failures

    use = failures.rule_use(
        os.path.join(out_dir, "turns.jsonl"),
        task=cfg.task,
        split=row["split"],
        env_options=cfg.env_options(),
        seed=proto.seed,
    )
    p, n = use["rule"], use["n"]
    keep = {k: row[k] for k in ("arm", "step", "gflops", "task", "split")}
    return keep | {
        "metric": "rule_use",
        "value": p,
        "stderr": math.sqrt(p * (1 - p) / max(n, 1)),
        "episodes": n,
        "as_10": use["as_10"],
    }


def _evaluate_points(cfg, seed, sdir, points, init, ledger, models, stage) -> None:
    from sftrl_jax.evaluation import evaluate as ev
    from sftrl_jax.evaluation import kl as kl_lib
    from sftrl_jax.evaluation import report

    prompt_sets: dict[str, list] = {}
    for arm, step, ckpt, gflops in points:
        todo = [s for s in cfg.eval_splits if not ledger.has("eval", seed, arm, step, s)]
        kl_todo = [s for s in cfg.eval_splits if not ledger.has("kl", seed, arm, step, s)]
        if not todo and not kl_todo:
            continue
        stage(f"seed {seed}: evaluating {arm} at step {step}")
        model, tokenizer, proc = models.get(ckpt)
        for split in todo:
            policy = _greedy(model, tokenizer, cfg, seed=seed, image_processor=proc)
            proto = ev.protocol(cfg.task, split, n_episodes=cfg.eval_episodes)
            summary = ev.evaluate(
                policy,
                tokenizer,
                proto,
                batch_size=cfg.eval_batch,
                progress=cfg.progress,
                out_dir=(out_dir := os.path.join(sdir, "eval", f"{arm}_{step}", split)),
                env_options=cfg.env_options(),
            )
            row = report.eval_row(arm=arm, step=step, gflops=gflops, summary=summary)
            rows = [row] + ([rule_use_row(row, proto, out_dir, cfg)] if cfg.task.startswith("gp") else [])
            ledger.write("eval", *({**r, "seed": seed} for r in rows))
        for split in kl_todo:
            if split not in prompt_sets:
                prompt_sets[split] = kl_prompts(cfg, tokenizer, split)
            if arm == "init":
                r = {"kl": 0.0, "kl_reverse": 0.0, "tokens": 0, "prompts": cfg.kl_prompts}
            else:
                ref_model = models.get(init)[0]
                r = kl_lib.policy_kl(
                    model, ref_model, tokenizer, prompt_sets[split], max_new_tokens=cfg.arms.max_new_tokens
                )
            ledger.write("kl", {"seed": seed, "arm": arm, "step": step, "gflops": gflops, "split": split, **r})
