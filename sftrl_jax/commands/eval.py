"""`sftrl eval`: evaluate a checkpoint with the paper's protocol."""

from __future__ import annotations

import json
import os

from sftrl_jax.errors import UserError

HELP = "evaluate a checkpoint with the paper's protocol"
EXAMPLES = """examples:
  sftrl eval --ckpt runs/rl/gp_l_tiny/final --task gp-l --split ood-rule
  sftrl eval --ckpt /ckpts/GP-VL-Init --task gp-vl --split ood-visual --recognition
  sftrl eval --ckpt runs/sft/x/final --task gp-l --split id --episodes 64 --run-dir runs/sft/x --arm sft
  sftrl eval --ckpt runs/sft/gp_l_tiny/final --task gp-l --split id --episodes 32 \
      --template sftrl_jax/envs/general_points/templates/gp_l_short.txt

Protocol (SPEC.md §1.8, §2.7, §3.6): GP 234 episodes (seed 42, 5 graded attempts with feedback);
V-IRL 48 routes (seed 12) or the 18 OOD-city routes, 2 attempts per waypoint; --recognition: one
turn, card recognition accuracy (gp-vl). Writes turns.jsonl, summary.json and summary.md to --out
(default <ckpt>/eval/<task>-<split>); with --run-dir also appends the headline to evals.jsonl.
"""


def add_arguments(parser):
    parser.add_argument("--ckpt", required=True, help="our checkpoint (sftrl convert / run final) or an HF folder")
    parser.add_argument("--task", required=True, help="gp-l | gp-vl | virl-l | virl-vl")
    parser.add_argument("--split", required=True, help="id | ood-rule | ood-visual")
    parser.add_argument("--recognition", action="store_true", help="GP-VL card recognition (one turn, no revision)")
    parser.add_argument("--episodes", type=int, default=None, help="override the protocol's episode count")
    parser.add_argument(
        "--batch-size", type=int, default=16, help="episodes run in parallel (one batched sampling call)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=256, help="the reference evaluator uses 256")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tokenizer", default=None, help="tokenizer folder (default: the checkpoint's, else the shipped one)"
    )
    parser.add_argument(
        "--template", default=None, help="GP prompt template file the model was trained with (default: ours)"
    )
    parser.add_argument("--out", default=None, help="output folder")
    parser.add_argument("--run-dir", default=None, help="append the result to <run-dir>/evals.jsonl")
    parser.add_argument("--arm", default="sft", choices=("init", "sft", "rl"), help="arm name for --run-dir")
    parser.add_argument("--step", type=int, default=0, help="step for --run-dir rows")
    parser.add_argument(
        "--gflops", type=float, default=None, help="compute for --run-dir rows (default: the run's last)"
    )


def run(args) -> int:
    from sftrl_jax.evaluation import evaluate as ev
    from sftrl_jax.evaluation import report
    from sftrl_jax.sampling.policy import SamplingSection, make_policy
    from sftrl_jax.train.metrics import read_jsonl
    from sftrl_jax.train.state import load_for_eval

    proto = ev.protocol(args.task, args.split, recognition=args.recognition, n_episodes=args.episodes)
    sampling = SamplingSection(  # before the model loads: a bad --temperature is refused at once
        max_new_tokens=args.max_new_tokens, temperature=max(args.temperature, 1e-6), top_p=args.top_p
    )
    model, tokenizer, proc = load_for_eval(args.ckpt, args.task, args.tokenizer)
    policy = make_policy(model, tokenizer, sampling, seed=args.seed, image_processor=proc, temperature=args.temperature)
    out = args.out or os.path.join(
        args.ckpt, "eval", f"{args.task}-{args.split}" + ("-recognition" if args.recognition else "")
    )
    env_options = {"template": args.template} if args.template else None
    if env_options and not args.task.startswith("gp"):
        raise UserError("--template applies to the GeneralPoints tasks (gp-l, gp-vl)")
    summary = ev.evaluate(policy, tokenizer, proto, batch_size=args.batch_size, out_dir=out, env_options=env_options)
    print(ev.markdown(summary))
    if args.run_dir:
        gflops = args.gflops
        metrics = os.path.join(args.run_dir, "metrics.jsonl")
        if gflops is None and os.path.exists(metrics):
            rows = [r for r in read_jsonl(metrics) if "train/gflops" in r]
            gflops = rows[-1]["train/gflops"] if rows else 0.0
        report.append_eval(args.run_dir, arm=args.arm, step=args.step, gflops=gflops or 0.0, summary=summary)
    print(json.dumps({k: v for k, v in summary.items() if isinstance(v, int | float | str)}, default=str))
    print(f"wrote {out}")
    return 0
