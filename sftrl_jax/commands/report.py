"""`sftrl report`: the Init/SFT/RL table and success-vs-compute curves from run folders, or a study's report."""

from __future__ import annotations

import os

HELP = "tables and plots from run folders"
EXAMPLES = """examples:
  sftrl report runs/demo --out runs/demo/report
  sftrl report runs/*/ --out report
  sftrl report runs/study/gp_l_small                 # a study folder: writes runs/study/gp_l_small/report/

Each run folder needs evals.jsonl (written by `sftrl eval --run-dir`, periodic evaluation in
`sftrl sft` / `sftrl rl`, and `sftrl demo`). Writes report.md and curves.png into --out.
A single folder holding study.json (written by `sftrl study`) gets the study report instead: Init / PPO /
GRPO / SFT over seeds (mean, std, pooled standard error, the paper's numbers), KL to Init, report.md,
curves.png and kl.png, into <folder>/report unless --out is given.
"""


def add_arguments(parser):
    parser.add_argument("runs", nargs="+", help="run folders, or one study folder (has study.json)")
    parser.add_argument("--out", default=None, help="output folder (default: report; <study>/report for a study)")


def run(args) -> int:
    from sftrl_jax.errors import UserError
    from sftrl_jax.evaluation import report, study_report

    studies = [d for d in args.runs if study_report.is_study(d)]
    if studies and len(args.runs) > 1:
        raise UserError(f"{studies[0]} is a study folder: report one study at a time (sftrl report {studies[0]})")
    if studies:
        paths = study_report.report(studies[0], args.out or os.path.join(studies[0], "report"))
    else:
        paths = report.report(args.runs, args.out or "report")
    print(open(paths["markdown"]).read())
    print(f"wrote {', '.join(paths.values())}")
    return 0
