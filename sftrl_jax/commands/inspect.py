"""`sftrl inspect`: not built yet (see the open issues)."""

HELP = "not built yet"
EXAMPLES = """example:
  sftrl inspect /path/to/config.json --mesh data=1,fsdp=8,tensor=1
"""


def add_arguments(parser):
    parser.add_argument("rest", nargs="*", help="(not built yet)")


def run(args) -> int:
    print("sftrl inspect: not yet — this command lands with its issue (see `issues`).")
    return 1
