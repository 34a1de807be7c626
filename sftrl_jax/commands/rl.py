"""`sftrl rl`: not built yet (see the open issues)."""

HELP = "not built yet"
EXAMPLES = """example:
  sftrl rl --config configs/rl/gp_l_tiny.yaml
"""


def add_arguments(parser):
    parser.add_argument("rest", nargs="*", help="(not built yet)")


def run(args) -> int:
    print("sftrl rl: not yet — this command lands with its issue (see `issues`).")
    return 1
