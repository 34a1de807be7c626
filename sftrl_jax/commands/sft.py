"""`sftrl sft`: not built yet (see the open issues)."""

HELP = "not built yet"
EXAMPLES = """example:
  sftrl sft --config configs/sft/gp_l_tiny.yaml train.steps=50
"""


def add_arguments(parser):
    parser.add_argument("rest", nargs="*", help="(not built yet)")


def run(args) -> int:
    print("sftrl sft: not yet — this command lands with its issue (see `issues`).")
    return 1
