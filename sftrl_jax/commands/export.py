"""`sftrl export`: not built yet (see the open issues)."""

HELP = "not built yet"
EXAMPLES = """example:
  sftrl export --ckpt ckpts/init --out hf/my-model
"""


def add_arguments(parser):
    parser.add_argument("rest", nargs="*", help="(not built yet)")


def run(args) -> int:
    print("sftrl export: not yet — this command lands with its issue (see `issues`).")
    return 1
