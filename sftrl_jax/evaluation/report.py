"""Tables and plots from run folders: success vs compute (the paper's Fig. 5) and Init/SFT/RL (Figs. 6-7).

A run folder holds `evals.jsonl`, one row per evaluation of one of its checkpoints:

    {"arm": "sft" | "rl" | "grpo" | "init", "step": 40, "gflops": 1.2e6, "task": "gp-l", "split": "ood-rule",
     "metric": "success_rate", "value": 0.15, "stderr": 0.023, "episodes": 234, "reward_mean": -1.9}

`sftrl eval --run-dir`, the SFT/RL loops (periodic eval) and the demo append such rows
(`append_eval`). `sftrl report RUN_DIR...` reads them all.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

from sftrl_jax.errors import UserError

EVALS_FILE = "evals.jsonl"
ARMS = ("init", "sft", "rl", "grpo")  # "rl" is PPO; "grpo" a second RL arm (GRPO)
COLORS = {"init": "tab:gray", "sft": "tab:orange", "rl": "tab:blue", "grpo": "tab:green"}


def append_eval(run_dir: str | os.PathLike, *, arm: str, step: int, gflops: float, summary: dict[str, Any]) -> dict:
    """Appends the headline metric of an `evaluate()` summary to `<run_dir>/evals.jsonl`."""
    row = eval_row(arm=arm, step=step, gflops=gflops, summary=summary)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, EVALS_FILE), "a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def eval_row(*, arm: str, step: int, gflops: float, summary: dict[str, Any]) -> dict:
    """The row `append_eval` appends, without writing it."""
    from sftrl_jax.evaluation.evaluate import headline

    if arm not in ARMS:
        raise UserError(f"unknown arm {arm!r}; arms: {', '.join(ARMS)}")
    metric, value, stderr = headline(summary)
    row = {
        "arm": arm,
        "step": int(step),
        "gflops": float(gflops),
        "task": summary["task"],
        "split": summary["split"],
        "metric": metric,
        "value": value,
        "stderr": stderr,
        "episodes": summary["episodes"],
    }
    if "reward_mean" in summary:  # mean reward per graded turn: moves before the success rate does
        row["reward_mean"] = float(summary["reward_mean"])
    return row


def load_rows(run_dirs: Iterable[str | os.PathLike]) -> list[dict[str, Any]]:
    rows = []
    for d in run_dirs:
        d = os.fspath(d)
        if not os.path.isdir(d):
            raise UserError(f"run folder {d!r} does not exist")
        path = os.path.join(d, EVALS_FILE)
        if not os.path.exists(path):
            raise UserError(
                f"run folder {d!r} has no {EVALS_FILE} (evaluate its checkpoints first: sftrl eval --run-dir {d})"
            )
        with open(path) as f:
            for n, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise UserError(f"{path}:{n}: not valid JSON ({e})") from None
                    rows.append({**row, "run": d})
    if not rows:
        raise UserError(f"no evaluations found in {', '.join(map(str, run_dirs))}")
    return rows


def _final(rows: Sequence[dict], arm: str, task: str, split: str, metric: str | None = None) -> dict | None:
    cands = [r for r in rows if (r["arm"], r["task"], r["split"]) == (arm, task, split)]
    cands = [r for r in cands if metric is None or r["metric"] == metric]
    return max(cands, key=lambda r: (r["gflops"], r["step"])) if cands else None


def table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: per task/split, Init and the last SFT / RL evaluation (with the change from Init); a
    second line gives the mean reward per turn where the rows carry it (small models move it long
    before they solve a task). A GRPO column appears only when some row is of the grpo arm."""
    # per split: the headline metric first, then rule use (a study's primary endpoint beside it)
    order = lambda k: (k[0], k[1] != "id", k[1], k[2] == "rule_use", k[2])  # noqa: E731
    keys = sorted({(r["task"], r["split"], r["metric"]) for r in rows}, key=order)
    arms = ("init", "rl", "grpo", "sft") if any(r["arm"] == "grpo" for r in rows) else ("init", "rl", "sft")
    names = {"init": "Init", "rl": "RL", "grpo": "GRPO", "sft": "SFT"}
    out = [
        "| task | split | metric | " + " | ".join(names[a] for a in arms) + " |",
        "|---|---|---|" + "---|" * len(arms),
    ]
    for task, split, metric in keys:
        final = {arm: _final(rows, arm, task, split, metric) for arm in arms}
        init = final["init"]
        lines = [(metric, "value", lambda v: f"{100 * v:.1f}%", lambda d: f"{100 * d:+.1f}")]
        if any(r is not None and "reward_mean" in r for r in final.values()):
            lines.append(("reward per turn", "reward_mean", lambda v: f"{v:.3f}", lambda d: f"{d:+.3f}"))
        for name, key, fmt, fmt_change in lines:
            cells = []
            for arm, r in final.items():
                if r is None or key not in r:
                    cells.append("—")
                    continue
                text = fmt(r[key])
                if key == "value":
                    text += f" ± {100 * r['stderr']:.1f}"
                if arm != "init" and init is not None and key in init:
                    text += f" ({fmt_change(r[key] - init[key])})"
                cells.append(text)
            out.append(f"| {task} | {split} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def finish_panel(ax, *, title: str, xlabel: str, ylabel: str, rate: bool = True) -> None:
    """Titles and a grid; a `rate` axis never goes below 0 and shows at least 0-5%; a legend once a
    curve is labelled."""
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if rate:
        ax.set_ylim(bottom=0.0, top=max(5.0, ax.get_ylim()[1]))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def save_figure(fig, plt, path: str | os.PathLike) -> str:
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return os.fspath(path)


def plot(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> str:
    """Success vs GFLOPs per task/split/metric (ID and OOD panels), one curve per arm, standard-error bars;
    a second row of panels with the mean reward per turn when the rows carry it."""
    plt = pyplot()
    panels = sorted({(r["task"], r["split"], r["metric"]) for r in rows}, key=lambda k: (k[0], k[1] != "id", k[1:]))
    n = len(panels)
    with_reward = any("reward_mean" in r for r in rows)
    n_rows = 2 if with_reward else 1
    fig, axes = plt.subplots(n_rows, n, figsize=(4.2 * n, 3.4 * n_rows), squeeze=False)
    for col, (task, split, metric) in enumerate(panels):
        lines = [("value", 100.0, f"{metric.replace('_', ' ')} (%)")]
        if with_reward:
            lines.append(("reward_mean", 1.0, "reward per turn"))
        for row, (key, scale, label) in enumerate(lines):
            ax = axes[row][col]
            _panel(ax, [r for r in rows if r["metric"] == metric], task, split, key, scale)
            finish_panel(ax, title=f"{task} {split}", xlabel="GFLOPs", ylabel=label, rate=key == "value")
    return save_figure(fig, plt, path)


def _panel(ax, rows: Sequence[dict[str, Any]], task: str, split: str, key: str, scale: float) -> None:
    """One curve per arm (starting at Init) of `key` against GFLOPs; error bars for the headline."""
    init = _final(rows, "init", task, split)
    init = init if init is not None and key in init else None
    for arm, marker in (("sft", "s"), ("rl", "o"), ("grpo", "^")):  # different markers: equal curves stay visible
        pts = sorted(
            (r for r in rows if r["arm"] == arm and r["task"] == task and r["split"] == split and key in r),
            key=lambda r: r["gflops"],
        )
        if not pts:
            continue
        if init is not None:
            pts = [init, *pts]
        x = [r["gflops"] for r in pts]
        y = [scale * r[key] for r in pts]
        e = [scale * r["stderr"] for r in pts] if key == "value" else None
        ax.errorbar(x, y, yerr=e, marker=marker, ms=4, mfc="none", capsize=2, color=COLORS[arm], label=arm.upper())
    if init is not None:
        ax.axhline(scale * init[key], color=COLORS["init"], ls="--", lw=1, label="Init")


def report(run_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike) -> dict[str, str]:
    """Writes `report.md` (table) and `curves.png` (plot) into `out_dir`; returns their paths."""
    rows = load_rows(run_dirs)
    os.makedirs(out_dir, exist_ok=True)
    png = plot(rows, os.path.join(out_dir, "curves.png"))
    md = os.path.join(out_dir, "report.md")
    with open(md, "w") as f:
        f.write("# SFT vs RL\n\n")
        f.write(table(rows))
        f.write(f"\n![success vs compute]({os.path.basename(png)})\n\nRuns: {', '.join(map(str, run_dirs))}\n")
    return {"markdown": md, "plot": png}
