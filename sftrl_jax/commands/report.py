"""`sftrl report`: the Init/SFT/RL table and success-vs-compute curves from run folders."""

from __future__ import annotations

HELP = "tables and plots from run folders"
EXAMPLES = """examples:
  sftrl report runs/demo/sft runs/demo/rl --out runs/demo/report
  sftrl report runs/*/ --out report

Each run folder needs evals.jsonl (written by `sftrl eval --run-dir`, periodic evaluation in
`sftrl sft` / `sftrl rl`, and `sftrl demo`). Writes report.md and curves.png into --out.
"""


def add_arguments(parser):
    parser.add_argument("runs", nargs="+", help="run folders")
    parser.add_argument("--out", default="report", help="output folder (report.md, curves.png)")


def run(args) -> int:
    from sftrl_jax.evaluation import report

    paths = report.report(args.runs, args.out)
    print(open(paths["markdown"]).read())
    print(f"wrote {paths['markdown']} and {paths['plot']}")
    return 0
