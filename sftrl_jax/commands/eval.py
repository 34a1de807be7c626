"""`sftrl eval`: not built yet (see the open issues)."""

HELP = "not built yet"
EXAMPLES = """example:
  sftrl eval --ckpt runs/rl/ckpt --task gp-l --split ood-rule
"""


def add_arguments(parser):
    parser.add_argument("rest", nargs="*", help="(not built yet)")


def run(args) -> int:
    print("sftrl eval: not yet — this command lands with its issue (see `issues`).")
    return 1
