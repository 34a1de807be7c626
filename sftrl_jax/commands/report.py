"""`sftrl report`: not built yet (see the open issues)."""

HELP = "not built yet"
EXAMPLES = """example:
  sftrl report runs/sft runs/rl
"""


def add_arguments(parser):
    parser.add_argument("rest", nargs="*", help="(not built yet)")


def run(args) -> int:
    print("sftrl report: not yet — this command lands with its issue (see `issues`).")
    return 1
