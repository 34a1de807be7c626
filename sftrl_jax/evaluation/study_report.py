"""The study report: Init, PPO, GRPO and SFT over several seeds, from one `sftrl study` folder.

A study folder holds

    study.json   {"task": "gp-l", "seeds": [0, 1, 2], ...}   marks the folder as a study
    evals.jsonl  `report.eval_row` rows plus "seed"; arms init, rl (PPO), grpo, sft; several compute
                 points per arm and seed, and each seed's own Init rows
    kl.jsonl     {"seed", "arm", "step", "gflops", "split", "kl", "kl_reverse", "prompts", "tokens"}: the mean
                 per-token KL(policy || Init) in nats on a split's prompts, per checkpoint and split
    base.json    optional: the base model's probe numbers, printed as they are

`report(study_dir, out_dir)` writes report.md (the final point of each arm per split: mean and spread over
seeds, the pooled binomial standard error, the paper's numbers beside; KL to Init per arm; one plain line per
arm on whether its OOD success moved beyond the error bars), curves.png (success vs GFLOPs, mean over seeds,
std bars) and kl.png (success vs KL to Init, one marker per checkpoint and seed).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from typing import Any

from sftrl_jax.errors import UserError
from sftrl_jax.evaluation import report as run_report
from sftrl_jax.integrity import read_json

STUDY_FILE = "study.json"
KL_FILE = "kl.jsonl"
BASE_FILE = "base.json"
ORDER = ("init", "rl", "grpo", "sft")
NAMES = {"init": "Init", "rl": "PPO", "grpo": "GRPO", "sft": "SFT"}
_MARKERS = {"init": "D", "rl": "o", "grpo": "^", "sft": "s"}
Z = 2.0  # "beyond the error bars": the difference of means is more than Z combined standard errors

# The paper's Init / RL (PPO) / SFT at equal compute from the shared Init (Llama-3.2-Vision-11B): SPEC §4.1
# (rule OOD, Fig. 6) and §4.2 (visual OOD, Fig. 7). It gives no ID numbers, only Fig. 5's curves (SPEC §4.3).
PAPER = {
    ("gp-l", "ood-rule"): {"init": 0.115, "rl": 0.150, "sft": 0.034},
    ("virl-l", "ood-rule"): {"init": 0.808, "rl": 0.918, "sft": 0.013},
    ("gp-vl", "ood-rule"): {"init": 0.112, "rl": 0.142, "sft": 0.056},
    ("virl-vl", "ood-rule"): {"init": 0.357, "rl": 0.450, "sft": 0.025},
    ("gp-vl", "ood-visual"): {"init": 0.236, "rl": 0.412, "sft": 0.137},
    ("virl-vl", "ood-visual"): {"init": 0.167, "rl": 0.778, "sft": 0.111},
}

_EVAL_KEYS = ("seed", "arm", "step", "gflops", "task", "split", "metric", "value", "episodes")
_KL_KEYS = ("seed", "arm", "step", "gflops", "split", "kl")
_NUMBERS = {"step", "gflops", "value", "episodes", "kl"}


@dataclasses.dataclass(frozen=True)
class Study:
    dir: str
    meta: dict[str, Any]  # study.json
    evals: list[dict[str, Any]]
    kl: list[dict[str, Any]]  # empty when the folder has no kl.jsonl
    base: dict[str, Any] | None

    @property
    def task(self) -> str:
        return self.meta.get("task") or self.evals[0]["task"]


@dataclasses.dataclass(frozen=True)
class ArmStats:
    """One arm's final point on one split, over seeds (rates in [0, 1])."""

    arm: str
    seeds: tuple[int, ...]
    values: tuple[float, ...]  # per seed, in the order of `seeds`
    episodes: int  # summed over seeds
    gflops: float  # mean over seeds

    @property
    def mean(self) -> float:
        return sum(self.values) / len(self.values)

    @property
    def std(self) -> float:
        """Sample standard deviation across seeds (n - 1); nan for one seed."""
        return _std(self.values)

    @property
    def stderr(self) -> float:
        """Pooled binomial standard error sqrt(p (1 - p) / (seeds x episodes)), p the mean over seeds."""
        p = self.mean
        return math.sqrt(max(p * (1 - p), 0.0) / self.episodes) if self.episodes else math.nan

    @property
    def sem(self) -> float:
        """The standard error of the mean used to compare arms: the larger of the seed-to-seed one (std / sqrt(n),
        which holds training noise but is itself noisy with few seeds) and the pooled binomial one (a floor)."""
        seed_sem = self.std / math.sqrt(len(self.values)) if len(self.values) > 1 else 0.0
        return max(seed_sem, self.stderr if not math.isnan(self.stderr) else 0.0)


@dataclasses.dataclass(frozen=True)
class Direction:
    diff: float  # arm mean - Init mean
    se: float  # sqrt(sem_arm^2 + sem_init^2)
    z: float  # diff / se
    verdict: str  # "above" | "below" | "within"


def is_study(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(path, STUDY_FILE))


def _std(xs: Sequence[float]) -> float:
    if len(xs) < 2:
        return math.nan
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _split_order(split: str) -> tuple:
    return (split != "id", split)


def _split_name(split: str) -> str:
    return {"id": "ID", "ood-rule": "OOD (rule)", "ood-visual": "OOD (visual)"}.get(split, split)


def _read_jsonl(path: str, required: Sequence[str]) -> list[dict[str, Any]]:
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: not valid JSON ({e})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            missing = [k for k in required if k not in row]
            if missing:
                raise UserError(f"{path}:{n}: missing {', '.join(missing)}")
            if row["arm"] not in ORDER:
                raise UserError(f"{path}:{n}: unknown arm {row['arm']!r}; arms: {', '.join(ORDER)}")
            if not isinstance(row["seed"], int):
                raise UserError(f"{path}:{n}: seed must be an integer, got {row['seed']!r}")
            for k in _NUMBERS.intersection(required):
                if isinstance(row[k], bool) or not isinstance(row[k], int | float):
                    raise UserError(f"{path}:{n}: {k} must be a number, got {row[k]!r}")
            rows.append(row)
    return rows


def load(study_dir: str | os.PathLike) -> Study:
    """Reads a study folder; a `UserError` names the file (and line) of anything missing or malformed."""
    d = os.fspath(study_dir)
    meta_path = os.path.join(d, STUDY_FILE)
    if not os.path.isfile(meta_path):
        raise UserError(f"{d!r} is not a study folder (no {STUDY_FILE})")
    meta = read_json(meta_path, what="not valid JSON")
    if not isinstance(meta, dict):
        raise UserError(f"{meta_path}: expected a JSON object")
    evals_path = os.path.join(d, run_report.EVALS_FILE)
    if not os.path.isfile(evals_path):
        raise UserError(f"study folder {d!r} has no {run_report.EVALS_FILE} (has `sftrl study` evaluated anything?)")
    evals = _read_jsonl(evals_path, _EVAL_KEYS)
    if not evals:
        raise UserError(f"{evals_path}: no evaluations yet")
    kl_path = os.path.join(d, KL_FILE)
    kl = _read_jsonl(kl_path, _KL_KEYS) if os.path.isfile(kl_path) else []
    base_path = os.path.join(d, BASE_FILE)
    base = read_json(base_path, what="not valid JSON") if os.path.isfile(base_path) else None
    if base is not None and not isinstance(base, dict):
        raise UserError(f"{base_path}: expected a JSON object")
    return Study(dir=d, meta=meta, evals=evals, kl=kl, base=base)


def _last(rows: Sequence[dict]) -> dict:
    return max(rows, key=lambda r: (r["gflops"], r["step"]))


def _by(rows: Sequence[dict], *keys: str) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out


def final_stats(evals: Sequence[dict]) -> dict[tuple[str, str, str], dict[str, ArmStats]]:
    """{(task, split, metric): {arm: ArmStats}} over each seed's last compute point (largest gflops, then step)."""
    out: dict[tuple[str, str, str], dict[str, ArmStats]] = {}
    keys = sorted({(r["task"], r["split"], r["metric"]) for r in evals}, key=lambda k: (k[0], *_split_order(k[1])))
    for task, split, metric in keys:
        rows = [r for r in evals if (r["task"], r["split"], r["metric"]) == (task, split, metric)]
        arms = {}
        for arm in ORDER:
            per_seed = {s: _last(rs) for (a, s), rs in _by(rows, "arm", "seed").items() if a == arm}
            if not per_seed:
                continue
            seeds = tuple(sorted(per_seed))
            arms[arm] = ArmStats(
                arm=arm,
                seeds=seeds,
                values=tuple(float(per_seed[s]["value"]) for s in seeds),
                episodes=sum(int(per_seed[s]["episodes"]) for s in seeds),
                gflops=sum(float(per_seed[s]["gflops"]) for s in seeds) / len(seeds),
            )
        out[(task, split, metric)] = arms
    return out


def direction(init: ArmStats, arm: ArmStats, *, z: float = Z) -> Direction:
    """Is `arm`'s mean above / below Init's by more than `z` combined standard errors, or within them?"""
    diff = arm.mean - init.mean
    se = math.sqrt(arm.sem**2 + init.sem**2)
    score = diff / se if se > 0 else (math.copysign(math.inf, diff) if diff else 0.0)
    verdict = "above" if score > z else "below" if score < -z else "within"
    return Direction(diff=diff, se=se, z=score, verdict=verdict)


def final_kl(kl: Sequence[dict]) -> dict[str, dict[str, tuple[float, float, float]]]:
    """{arm: {split: (mean KL, std KL, mean reverse KL)}} over seeds at each seed's last checkpoint."""
    out: dict[str, dict[str, tuple[float, float, float]]] = {}
    for (arm, split), rows in sorted(_by(kl, "arm", "split").items(), key=lambda kv: _split_order(kv[0][1])):
        last = [_last(rs) for rs in _by(rows, "seed").values()]
        fwd = [float(r["kl"]) for r in last]
        rev = [float(r["kl_reverse"]) for r in last if "kl_reverse" in r]
        out.setdefault(arm, {})[split] = (sum(fwd) / len(fwd), _std(fwd), sum(rev) / len(rev) if rev else math.nan)
    return out


def curve(
    evals: Sequence[dict], *, task: str, split: str, arm: str, metric: str | None = None
) -> tuple[list[float], list[float], list[float]]:
    """(x, y, err): Init then the arm's compute points of `metric` (default: the split's only one), the k-th
    point of every seed averaged (x = mean gflops, y = mean value, err = std across seeds; 0 where only
    one seed has that point)."""
    rows = [r for r in evals if r["task"] == task and r["split"] == split and metric in (None, r["metric"])]
    init = [_last(rs) for (a, _), rs in _by(rows, "arm", "seed").items() if a == "init"]
    points: list[list[dict]] = [init] if init else []
    for (a, _), rs in sorted(_by(rows, "arm", "seed").items(), key=lambda kv: kv[0][1]):
        if a != arm:
            continue
        for k, r in enumerate(sorted(rs, key=lambda r: (r["gflops"], r["step"]))):
            while len(points) <= k + bool(init):
                points.append([])
            points[k + bool(init)].append(r)
    x, y, e = [], [], []
    for pts in points:
        vals = [float(r["value"]) for r in pts]
        x.append(sum(float(r["gflops"]) for r in pts) / len(pts))
        y.append(sum(vals) / len(vals))
        e.append(0.0 if len(vals) < 2 else _std(vals))
    return x, y, e


def kl_points(study: Study) -> list[dict[str, Any]]:
    """Each KL row joined to the evaluation of the same seed, arm, step and split (rows without one are left out):
    {"seed", "arm", "step", "split", "kl", "value"}."""
    index = {  # the headline metric's rows (not rule use)
        (r["seed"], r["arm"], r["step"], r["split"]): r
        for r in study.evals
        if r["task"] == study.task and r["metric"] != "rule_use"
    }
    out = []
    for r in study.kl:
        ev = index.get((r["seed"], r["arm"], r["step"], r["split"]))
        if ev is not None:
            out.append({k: r[k] for k in ("seed", "arm", "step", "split", "kl")} | {"value": float(ev["value"])})
    return out


def _pct(v: float) -> str:
    return f"{100 * v:.1f}"


def _pm(v: float) -> str:
    return "—" if math.isnan(v) else _pct(v)


def markdown(study: Study) -> str:
    stats = final_stats(study.evals)
    seeds = sorted({r["seed"] for r in study.evals})
    out = [
        f"# Study: {study.task}, seeds {', '.join(map(str, seeds))}\n",
        "The final compute point of each arm and seed. **mean ± std**: mean over seeds ± the standard deviation "
        "across seeds (n − 1); **pooled s.e.**: the binomial standard error sqrt(p(1 − p) / (seeds × episodes)); "
        "values in points (%). PPO is the `rl` arm, the paper's RL.\n",
    ]
    listed = study.meta.get("seeds")
    missing = [s for s in listed if s not in seeds] if isinstance(listed, list) else []
    if missing:
        out.append(f"Seeds in {STUDY_FILE} with no evaluation yet: {', '.join(map(str, missing))}.\n")
    for (task, split, metric), arms in stats.items():
        paper = PAPER.get((task, split), {})
        out.append(f"## {_split_name(split)}: {task} {split}, {metric}\n")
        out.append("| arm | mean ± std | pooled s.e. | per seed | change from Init | GFLOPs | paper |")
        out.append("|---|---|---|---|---|---|---|")
        init = arms.get("init")
        for arm in ORDER:
            s = arms.get(arm)
            if s is None:
                continue
            per_seed = ", ".join(f"s{seed} {_pct(v)}" for seed, v in zip(s.seeds, s.values))
            change = "—" if arm == "init" or init is None else f"{100 * (s.mean - init.mean):+.1f}"
            p = paper.get(arm)
            paper_cell = "—" if p is None else f"{_pct(p)}%"
            if p is not None and arm != "init" and "init" in paper:
                paper_cell += f" ({100 * (p - paper['init']):+.1f})"
            out.append(
                f"| {NAMES[arm]} | {_pct(s.mean)}% ± {_pm(s.std)} | {_pm(s.stderr)} | {per_seed} | {change} | "
                f"{s.gflops:.4g} | {paper_cell} |"
            )
        out.append("")
    tasks = {task for task, _, _ in stats}
    if any(k in PAPER for k in ((t, s) for t, s, _ in stats)):
        out.append(
            "Paper: Llama-3.2-Vision-11B, Init → RL (PPO) / SFT at equal compute from the shared Init (SPEC §4.1, "
            "Fig. 6; §4.2, Fig. 7); it has no GRPO arm, and gives "
            + ("GP-L " if tasks == {"gp-l"} else "")
            + "ID results only as curves (Fig. 5), no numbers (SPEC §4.3).\n"
        )

    out.append(f"## OOD vs Init at the final point (beyond the error bars = more than {Z:g} combined s.e.)\n")
    out.append("Combined s.e. = sqrt(se_arm² + se_Init²), each se the larger of std/sqrt(seeds) and the pooled s.e.\n")
    for (task, split, metric), arms in stats.items():
        if split == "id":
            continue
        init = arms.get("init")
        for arm in ORDER[1:]:
            if arm not in arms:
                continue
            if init is None:
                out.append(f"- {NAMES[arm]} ({split}, {metric}): no Init evaluation on {split} to compare with.")
                continue
            d = direction(init, arms[arm])
            verdict = {
                "above": "**above Init beyond the error bars**",
                "below": "**below Init beyond the error bars**",
                "within": "within the error bars: no clear change from Init",
            }[d.verdict]
            out.append(
                f"- {NAMES[arm]} ({task} {split}, {metric}): {_pct(arms[arm].mean)}% vs Init {_pct(init.mean)}%, "
                f"{100 * d.diff:+.1f} points, combined s.e. {_pct(d.se)} (z = {d.z:+.1f}): {verdict}."
            )
    out.append("")

    out.append("## KL to Init at the final point (nats per token, mean ± std over seeds)\n")
    if not study.kl:
        out.append(f"No {KL_FILE} in the study folder: no KL table or plot.\n")
    else:
        kl = final_kl(study.kl)
        splits = sorted({r["split"] for r in study.kl}, key=_split_order)
        head = [f"KL {_split_name(s)}" for s in splits] + [f"reverse KL {_split_name(s)}" for s in splits]
        out.append("| arm | " + " | ".join(head) + " |")
        out.append("|---|" + "---|" * len(head))
        for arm in ORDER:
            if arm not in kl:
                continue
            fwd = [kl[arm].get(s) for s in splits]
            cells = ["—" if v is None else f"{v[0]:.4f}" + ("" if math.isnan(v[1]) else f" ± {v[1]:.4f}") for v in fwd]
            cells += ["—" if v is None or math.isnan(v[2]) else f"{v[2]:.4f}" for v in fwd]
            out.append(f"| {NAMES[arm]} | " + " | ".join(cells) + " |")
        out.append("")

    if study.base is not None:
        out.append(f"## Base model ({BASE_FILE})\n")
        out.append(_base_table(study.base))
    if study.task.startswith("gp") and any(
        os.path.isdir(os.path.join(study.dir, f"seed{r['seed']}", "eval")) for r in study.evals
    ):
        from sftrl_jax.evaluation import failures

        out.append(failures.study_section(study.dir, study.evals, task=study.task, env_options=_env_options(study)))
    return "\n".join(out) + "\n"


def _env_options(study: Study) -> dict[str, Any]:
    """The evaluation's env options, from the study's saved config (the prompt wording)."""
    path = os.path.join(study.dir, "study_config.yaml")
    if not os.path.exists(path):
        return {}
    from sftrl_jax import config as config_lib
    from sftrl_jax.envs.general_points import prompts

    return prompts.template_options(config_lib.read_yaml(path).get("prompt", "short"))


def _base_table(base: dict[str, Any]) -> str:
    """Whatever numbers base.json has: one row per object that holds plain values, one column per key."""
    groups: dict[str, dict[str, Any]] = {}

    def walk(node: dict, path: list[str]) -> None:
        leaves = {k: v for k, v in node.items() if not isinstance(v, dict)}
        if leaves:
            groups[" / ".join(path) or "—"] = leaves
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, [*path, str(k)])

    walk(base, [])
    cols = list(dict.fromkeys(k for leaves in groups.values() for k in leaves))

    def fmt(v: Any) -> str:
        if isinstance(v, bool) or not isinstance(v, int | float):
            return json.dumps(v) if not isinstance(v, str) else v
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, leaves in groups.items():
        lines.append(f"| {name} | " + " | ".join(fmt(leaves[c]) if c in leaves else "—" for c in cols) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(study: Study, path: str | os.PathLike) -> str:
    """Success (%) vs GFLOPs, one panel per split, one curve per arm: the mean over seeds, std bars, Init first."""
    plt = run_report.pyplot()
    panels = sorted(
        {(r["task"], r["split"], r["metric"]) for r in study.evals}, key=lambda k: (k[0], *_split_order(k[1]))
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False)
    for ax, (task, split, metric) in zip(axes[0], panels):
        arms = {r["arm"] for r in study.evals if r["task"] == task and r["split"] == split}
        for arm in ORDER[1:]:
            if arm not in arms:
                continue
            x, y, e = curve(study.evals, task=task, split=split, arm=arm, metric=metric)
            ax.errorbar(
                x,
                [100 * v for v in y],
                yerr=[100 * v for v in e],
                marker=_MARKERS[arm],
                ms=4,
                mfc="none",
                capsize=2,
                color=run_report.COLORS[arm],
                label=NAMES[arm],
            )
        if "init" in arms:
            rows = [r for r in study.evals if (r["task"], r["split"], r["metric"]) == (task, split, metric)]
            init = [_last(rs)["value"] for (a, _), rs in _by(rows, "arm", "seed").items() if a == "init"]
            ax.axhline(100 * sum(init) / len(init), color=run_report.COLORS["init"], ls="--", lw=1, label="Init")
        name = metric.replace("_", " ")
        run_report.finish_panel(ax, title=f"{task} {_split_name(split)}: {name}", xlabel="GFLOPs", ylabel=f"{name} (%)")
    return run_report.save_figure(fig, plt, path)


def plot_kl(study: Study, path: str | os.PathLike) -> str:
    """Success (%) vs KL(policy || Init) on the same split's prompts, one panel per split (ID, OOD), one marker per
    checkpoint and seed, a thin line through each seed's checkpoints: did the arm that moved further lose more?"""
    plt = run_report.pyplot()
    pts = kl_points(study)
    splits = sorted({p["split"] for p in pts}, key=_split_order) or ["ood-rule"]
    fig, axes = plt.subplots(1, len(splits), figsize=(4.6 * len(splits), 3.6), squeeze=False)
    for ax, split in zip(axes[0], splits):
        by_arm_seed = _by([p for p in pts if p["split"] == split], "arm", "seed")
        inits = {s: min(rs, key=lambda r: r["step"]) for (a, s), rs in by_arm_seed.items() if a == "init"}
        for arm in ORDER:
            labelled = False
            for (a, seed), rs in sorted(by_arm_seed.items()):
                if a != arm:
                    continue
                rs = sorted(rs, key=lambda r: r["step"])
                color = run_report.COLORS[arm]
                x, y = [r["kl"] for r in rs], [100 * r["value"] for r in rs]
                ax.scatter(
                    x, y, color=color, marker=_MARKERS[arm], s=18, zorder=3, label=None if labelled else NAMES[arm]
                )
                labelled = True
                if arm != "init":  # the seed's path from its own Init
                    line = ([inits[seed]] if seed in inits else []) + rs
                    ax.plot([r["kl"] for r in line], [100 * r["value"] for r in line], color=color, lw=0.6, alpha=0.4)
        title = f"{study.task} {_split_name(split)}"
        run_report.finish_panel(ax, title=title, xlabel="KL(policy ‖ Init), nats per token", ylabel="success (%)")
    return run_report.save_figure(fig, plt, path)


def report(study_dir: str | os.PathLike, out_dir: str | os.PathLike) -> dict[str, str]:
    """Writes report.md, curves.png and kl.png into `out_dir`; returns {"markdown", "plot", "kl_plot"} paths."""
    study = load(study_dir)
    os.makedirs(out_dir, exist_ok=True)
    paths = {"plot": plot_curves(study, os.path.join(out_dir, "curves.png"))}
    if study.kl:
        paths["kl_plot"] = plot_kl(study, os.path.join(out_dir, "kl.png"))
    md = os.path.join(out_dir, "report.md")
    with open(md, "w") as f:
        f.write(markdown(study))
        f.write(f"\n![success vs compute]({os.path.basename(paths['plot'])})\n")
        if "kl_plot" in paths:
            f.write(f"\n![success vs KL to Init]({os.path.basename(paths['kl_plot'])})\n")
        f.write(f"\nStudy: {study.dir}\n")
    return {"markdown": md, **paths}
