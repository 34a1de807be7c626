"""`sftrl convert`: not built yet (see the open issues)."""

HELP = "not built yet"
EXAMPLES = """example:
  sftrl convert --hf /path/to/Llama-3.2-11B-Vision-Instruct --out ckpts/init
"""


def add_arguments(parser):
    parser.add_argument("rest", nargs="*", help="(not built yet)")


def run(args) -> int:
    print("sftrl convert: not yet — this command lands with its issue (see `issues`).")
    return 1
