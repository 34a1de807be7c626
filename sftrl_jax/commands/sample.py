"""`sftrl sample`: not built yet (see the open issues)."""

HELP = "not built yet"
EXAMPLES = """example:
  sftrl sample --model ckpts/init --prompt 'Hello'
"""


def add_arguments(parser):
    parser.add_argument("rest", nargs="*", help="(not built yet)")


def run(args) -> int:
    print("sftrl sample: not yet — this command lands with its issue (see `issues`).")
    return 1
