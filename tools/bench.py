"""Benchmarks. Each subcommand prints its headline number as its LAST line and appends a record
(with the command that produced it) to docs/BENCHMARKS.md.

    .venv/bin/python tools/bench.py verifier     # last line: verifier answers/s: N
    .venv/bin/python tools/bench.py sampler      # last line: sampler speedup vs transformers: X.XXx
    .venv/bin/python tools/bench.py sft          # last line: sft speedup vs pytorch: X.XXx
    .venv/bin/python tools/bench.py rollout      # last line: rollout time outside the sampler: X.X%
    .venv/bin/python tools/bench.py rewards      # last line: rewards answers/s: device N, host M
    .venv/bin/python tools/bench.py lora         # last line: lora sampler: forward-applied / merged ...: X.XXx
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = ROOT / "docs" / "BENCHMARKS.md"
_HEADER = """# Benchmarks

Produced by `tools/bench.py`; each entry states the command, the machine and the numbers.
"""


def record(title: str, command: str, lines: list[str], *, path: Path = BENCHMARKS_MD) -> None:
    """Appends one entry to docs/BENCHMARKS.md (created with a header if absent)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_text(_HEADER, encoding="utf-8")
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, Python {platform.python_version()}"
    body = "\n".join(f"- {line}" for line in lines)
    with path.open("a", encoding="utf-8") as f:
        f.write(f"\n## {title} ({stamp})\n\nCommand: `{command}`  \nMachine: {machine}\n\n{body}\n")


# --------------------------------------------------------------------------------------------- verifier


def _answer_mix(rng: np.random.Generator, n_hands: int):
    """(text, puzzle, language_only) triples: a realistic mix of right and wrong answers."""
    from sftrl_jax.envs.general_points import cards, expert, solver, verifier

    items = []
    for i in range(n_hands):
        face10 = i % 2 == 0
        hand = cards.deal(rng, face_cards_as_10=face10, ood=not face10, color="black")
        values, symbols = hand.values(face_cards_as_10=face10), list(hand.symbols)
        puzzle = verifier.Puzzle(values, symbols)
        sol = expert.choose_solution(values, rng=rng)
        nums = [str(v) for v in values]
        kind = rng.random()
        if kind < 0.30:  # right, in the trained (regex) format
            text = expert.format_answer(symbols, values, sol)
        elif kind < 0.40:  # right, as strict JSON
            text = json.dumps({"cards": symbols, "number": list(values), "formula": f"{sol}=24"})
        elif kind < 0.60:  # legal formula with the right numbers but the wrong value
            ops = rng.choice(list("+-*/"), size=3)
            wrong = f"{nums[0]}{ops[0]}{nums[1]}{ops[1]}{nums[2]}{ops[2]}{nums[3]}"
            if wrong in solver.solutions(values):
                wrong = f"({wrong}"
            text = expert.format_answer(symbols, values, wrong)
        elif kind < 0.70:  # illegal characters (spaces)
            text = expert.format_answer(symbols, values, " + ".join(nums))
        elif kind < 0.85:  # a wrong number, one unused
            text = expert.format_answer(symbols, values, sol.replace(nums[0], str(int(nums[0]) % 13 + 1), 1))
        elif kind < 0.90:  # unclosed parenthesis
            text = expert.format_answer(symbols, values, "(" + sol)
        else:  # prose without a formula
            text = f"The cards are {', '.join(symbols)}. I think we can reach 24 by multiplying and adding them."
        items.append((text, puzzle, bool(rng.random() < 0.5)))
    return items


def _rate(items, *, exact: bool, seconds: float, repeat: bool = True) -> tuple[float, float, int]:
    """(answers per CPU-second of this process, answers per wall-second, answers scored).

    CPU time is the honest per-core measure on a shared machine: wall time also counts the time other
    processes hold our core."""
    from sftrl_jax.envs.general_points import verifier

    done, wall, cpu = 0, time.perf_counter(), time.process_time()
    while True:
        for text, puzzle, language_only in items:
            verifier.score(text, puzzle, language_only=language_only, exact=exact)
        done += len(items)
        if not repeat or time.perf_counter() - wall >= seconds:
            return done / (time.process_time() - cpu), done / (time.perf_counter() - wall), done


def bench_verifier(args) -> int:
    from sftrl_jax.envs.general_points import cards, render, verifier

    rng = np.random.default_rng(args.seed)
    # Dealing from a cold start (solver cache empty): an evaluation-sized batch, then a long run.
    t = time.process_time()
    for i in range(234):
        cards.deal(rng, face_cards_as_10=i % 2 == 0, ood=i % 2 == 1)
    deal_cold = (time.process_time() - t) / 234 * 1e3
    t = time.process_time()
    for i in range(args.deals):
        cards.deal(rng, face_cards_as_10=i % 2 == 0, ood=i % 2 == 1)
    deal_long = (time.process_time() - t) / args.deals * 1e3

    items = _answer_mix(rng, args.hands)
    # The harness's 20k texts and hands are long-lived: keep the garbage collector from rescanning them
    # (a trainer's long-lived state is arrays, not millions of small Python objects).
    gc.collect()
    gc.freeze()
    verifier.clear_cache()
    unique_cpu, unique_wall, _ = _rate(items, exact=True, seconds=0, repeat=False)  # every answer new
    steady_cpu, steady_wall, n_scored = _rate(items, exact=True, seconds=args.seconds)
    verifier.clear_cache()
    float_cpu, float_wall, _ = _rate(items, exact=False, seconds=0, repeat=False)
    gc.unfreeze()

    faces = [(int(r), s) for r in range(1, 14) for s in "SH"]
    t = time.process_time()
    render.render_cards([r for r, _ in faces[:4]], [s for _, s in faces[:4]])
    render_cold = (time.process_time() - t) * 1e3
    for r, s in faces:  # warm the 26 faces used below
        render.card_face(r, s)
    t = time.process_time()
    for i in range(20):
        picks = [faces[(i * 5 + k) % len(faces)] for k in range(4)]
        render.render_cards([r for r, _ in picks], [s for _, s in picks])
    render_ms = (time.process_time() - t) / 20 * 1e3

    headline = min(unique_cpu, steady_cpu)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        f"one thread; load average {load:.2f} during the run; rates per CPU-second of this process (wall in "
        "brackets); the answer set is frozen out of the garbage collector",
        f"deal ms (CPU) per solvable hand, solving included: {deal_cold:.3f} (first 234 hands, empty solver cache), "
        f"{deal_long:.3f} (next {args.deals} hands); half ID, half rule-OOD",
        f"answer mix: {len(items)} answers over {len(items)} hands (30% right trained format, 10% right strict "
        "JSON, 20% wrong value, 10% spaces, 15% wrong number, 5% unclosed '(', 10% prose; half gp-vl)",
        f"verifier answers/s, exact, every answer new: {unique_cpu:,.0f} ({unique_wall:,.0f} wall)",
        f"verifier answers/s, exact, answers repeated ({n_scored} scored in {args.seconds:g} s): "
        f"{steady_cpu:,.0f} ({steady_wall:,.0f} wall)",
        f"verifier answers/s, reference float check (exact=False), every answer new: {float_cpu:,.0f} "
        f"({float_wall:,.0f} wall)",
        f"render ms (CPU) per 1200x1200 GP-VL image: {render_ms:.2f} (card faces cached; first image {render_cold:.1f} ms)",
        f"verifier answers/s: {headline:,.0f} (the lower of the two exact rates)",
    ]
    for line in lines:
        print(line)
    if not args.no_record:
        record("verifier", ".venv/bin/python tools/bench.py verifier", lines)
    print(f"verifier answers/s: {headline:.0f}")
    return 0


# ------------------------------------------------------------------------------------------ not yet built


def not_built(args) -> int:
    print(f"{args.command}: not built yet", file=sys.stderr)
    print("not built yet")
    return 1


def bench_sft_cmd(args) -> int:
    sys.path.insert(0, str(ROOT / "tools"))
    import bench_sft

    lines = bench_sft.bench_sft(args)
    if not args.no_record:
        record(
            "sft",
            f".venv/bin/python tools/bench.py sft --batch {args.batch} --length {args.length} --steps {args.steps} --rounds {args.rounds}",
            lines,
        )
    return 0


def affinity_prefix() -> str:
    """`taskset -c LIST ` when this process is pinned to fewer CPUs than the machine has, else ""."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return ""
    if len(cpus) >= (os.cpu_count() or len(cpus)):
        return ""
    return f"taskset -c {','.join(map(str, cpus))} "


def bench_sampler_cmd(args) -> int:
    sys.path.insert(0, str(ROOT / "tools"))
    import bench_sampler

    lines, ratio = bench_sampler.bench_sampler(args)
    for line in lines:
        print(line)
    if not args.no_record:
        command = (
            f".venv/bin/python tools/bench.py sampler --batch {args.batch} --prompt {args.prompt} "
            f"--new-tokens {args.new_tokens} --repeats {args.repeats} --rounds {args.rounds}"
        )
        record("sampler", command, lines)
    print(f"sampler speedup vs transformers: {ratio:.2f}x")
    return 0


def _print_and_record(args, title: str, lines: list[str], command: str) -> int:
    for line in lines:
        print(line)
    if not args.no_record:
        record(title, command, lines)
    return 0


def bench_rollout_cmd(args) -> int:
    sys.path.insert(0, str(ROOT / "tools"))
    import bench_rollout

    command = (
        f"{affinity_prefix()}.venv/bin/python tools/bench.py rollout --envs {args.envs} --turns {args.turns} "
        f"--new-tokens {args.new_tokens}"
    )
    return _print_and_record(args, "rollout", bench_rollout.bench_rollout(args)[0], command)


def bench_rewards_cmd(args) -> int:
    sys.path.insert(0, str(ROOT / "tools"))
    import bench_rewards

    lines, _ = bench_rewards.bench_rewards(args, _answer_mix)
    if args.grpo_updates > 1:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            lines[-1:-1] = bench_rewards.grpo_share(args.grpo_updates, tmp)
    for line in lines[:-1]:
        print(line)
    if not args.no_record:
        command = f".venv/bin/python tools/bench.py rewards --batch {args.batch} --hands {args.hands}"
        record("rewards", f"{command} --grpo-updates {args.grpo_updates}", lines)
    print(lines[-1])
    return 0


def bench_lora_cmd(args) -> int:
    sys.path.insert(0, str(ROOT / "tools"))
    import bench_lora

    command = (
        f".venv/bin/python tools/bench.py lora --rank {args.rank} --batch {args.batch} --prompt {args.prompt} "
        f"--new-tokens {args.new_tokens} --repeats {args.repeats}"
    )
    return _print_and_record(args, "lora sampler", bench_lora.bench_lora(args)[0], command)


COMMANDS = {
    "verifier": (bench_verifier, "GeneralPoints verifier throughput on one core, deal and render times"),
    "sampler": (bench_sampler_cmd, "sampler (ours vs transformers, same weights and batch)"),
    "sft": (lambda args: bench_sft_cmd(args), "SFT step (ours vs PyTorch)"),
    "rollout": (bench_rollout_cmd, "GP-L rollout of 64 envs: time in the sampler vs outside it"),
    "rewards": (bench_rewards_cmd, "GP device reward (jit, CPU) vs the host verifier, same answers"),
    "lora": (bench_lora_cmd, "the sampler with LoRA adapters in the forward vs merged into the weights"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/bench.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--no-record", action="store_true", help="do not append to docs/BENCHMARKS.md")
        if name == "verifier":
            p.add_argument("--seconds", type=float, default=3.0, help="timing length of the repeated-answer run")
            p.add_argument("--hands", type=int, default=20_000, help="hands (one answer each) in the answer mix")
            p.add_argument("--deals", type=int, default=5_000, help="hands dealt for the long dealing timing")
            p.add_argument("--seed", type=int, default=0)
        if name == "sampler":
            p.add_argument("--batch", type=int, default=16)
            p.add_argument("--prompt", type=int, default=64, help="prompt tokens per row")
            p.add_argument("--new-tokens", type=int, default=128, help="exactly this many new tokens per row")
            p.add_argument("--repeats", type=int, default=3, help="timed calls per process (after one warm-up)")
            p.add_argument("--rounds", type=int, default=2, help="alternating processes per side")
            p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=("float32", "bfloat16"))
            p.add_argument("--max-load", type=float, default=2.5, help="wait for the load average to drop below this")
            p.add_argument("--wait-seconds", type=float, default=900)
            p.add_argument(
                "--tensor-parallel", action="store_true", help="also time ours on one XLA device per core, tensor=-1"
            )
        if name == "lora":
            p.add_argument("--rank", type=int, default=16)
            p.add_argument("--batch", type=int, default=16)
            p.add_argument("--prompt", type=int, default=64, help="prompt tokens per row")
            p.add_argument("--new-tokens", type=int, default=128, help="exactly this many new tokens per row")
            p.add_argument("--repeats", type=int, default=3, help="timed calls per side (after one warm-up)")
        if name == "rewards":
            p.add_argument("--batch", type=int, default=4096, help="answers per device call")
            p.add_argument("--hands", type=int, default=20_000, help="answers in the mix (one per hand)")
            p.add_argument("--seed", type=int, default=0)
            p.add_argument(
                "--grpo-updates", type=int, default=4, help="tiny GRPO updates per flag (first untimed; <2: skip)"
            )
        if name == "rollout":
            p.add_argument("--envs", type=int, default=64, help="GP-L environments stepped in lock-step")
            p.add_argument("--turns", type=int, default=6, help="lock-step turns (6 = a whole failed episode)")
            p.add_argument("--new-tokens", type=int, default=128, help="max_new_tokens per answer (paper RL: 512)")
            p.add_argument("--temperature", type=float, default=0.2, help="sampling temperature (paper RL: 0.2)")
            p.add_argument("--seed", type=int, default=0)
        if name == "sft":
            p.add_argument("--batch", type=int, default=8)
            p.add_argument("--length", type=int, default=256)
            p.add_argument("--steps", type=int, default=5, help="timed steps per process (median of all reported)")
            p.add_argument("--warmup", type=int, default=2)
            p.add_argument("--rounds", type=int, default=2, help="alternating processes per side")
            p.add_argument("--max-load", type=float, default=1.0, help="wait for the load average to drop below this")
            p.add_argument("--wait-seconds", type=float, default=900)
    args = parser.parse_args(argv)
    return COMMANDS[args.command][0](args)


if __name__ == "__main__":
    sys.exit(main())
