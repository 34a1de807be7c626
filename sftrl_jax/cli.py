"""`sftrl` entry point. Thin: each subcommand lives in `sftrl_jax/commands/<name>.py`.

A command module defines `HELP` (one line), `EXAMPLES` (shown by `--help`), `add_arguments(parser)`
and `run(args) -> int`. Modules are imported only when their command runs, so `sftrl --help` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import threading
import time

from sftrl_jax.errors import SaveError, UserError

# (command, module, one-line help). Help strings live here so `sftrl --help` imports nothing heavy.
COMMANDS: tuple[tuple[str, str, str], ...] = (
    ("convert", "convert", "convert a Hugging Face checkpoint folder to an orbax checkpoint"),
    ("export", "export", "export an orbax checkpoint back to a Hugging Face folder"),
    ("inspect", "inspect", "print a model's config summary and parameter count without allocating weights"),
    ("plan", "plan", "compile a run's programs abstractly on N fake devices: per-device memory, FLOPs, collectives"),
    ("data", "data", "generate SFT data (conversation JSON) from the environments"),
    ("sft", "sft", "supervised fine-tuning from a YAML config"),
    ("rl", "rl", "reinforcement learning (PPO, GRPO) from a YAML config"),
    ("eval", "eval", "evaluate a checkpoint with the paper's protocol"),
    ("report", "report", "tables and plots from run folders"),
    ("sample", "sample", "generate from a model for a quick interactive check"),
    ("study", "study", "the small-scale study: pretrained base, warm-up, PPO / GRPO / SFT arms, evaluations, KL"),
    ("demo", "demo", "the end-to-end CPU demo: SFT warm-up, then SFT vs RL arms, evaluated ID and OOD"),
)


NO_JAX = ("data", "report")  # commands that never compile anything


def _module(name: str):
    return importlib.import_module(f"sftrl_jax.commands.{name}")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sftrl",
        description="sftrl_jax: SFT and RL post-training of vision-language models in JAX.",
        epilog="Run `sftrl <command> --help` for a command's options and examples.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, module, help_ in COMMANDS:
        if command is None or command != name:
            sub.add_parser(name, help=help_)
            continue
        mod = _module(module)
        p = sub.add_parser(
            name,
            help=help_,
            description=help_,
            epilog=mod.EXAMPLES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        mod.add_arguments(p)
    return parser


def enable_compilation_cache() -> None:
    """Persistent XLA cache, so a second run of the same config skips compilation.

    `SFTRL_COMPILATION_CACHE` sets the folder (default ~/.cache/sftrl_jax/xla; empty = off).
    """
    path = os.environ.get("SFTRL_COMPILATION_CACHE", os.path.expanduser("~/.cache/sftrl_jax/xla"))
    if path:
        import jax

        jax.config.update("jax_compilation_cache_dir", path)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    known = {name for name, _, _ in COMMANDS}
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in known else None)
    args = parser.parse_args(argv)
    args.argv = argv  # the command line as given (a command that re-runs itself in a fresh process)
    if args.command is None:
        parser.print_help()
        return 0
    module = dict((n, m) for n, m, _ in COMMANDS)[args.command]
    mod = _module(module)
    if module not in NO_JAX:
        enable_compilation_cache()
    try:
        return int(mod.run(args) or 0)
    except UserError as e:  # a user-caused problem: message only, no traceback
        print(f"sftrl {args.command}: error: {e}", file=sys.stderr)
        if isinstance(e, SaveError):
            exit_without_stuck_threads(2)
        return 2


def exit_without_stuck_threads(code: int, *, grace_s: float = 5.0) -> None:
    """Ends the process with `code` if threads would keep it alive. After a failed save, orbax's writer
    threads can wait minutes for a signal of the failed save that never comes, and Python waits for
    them at exit: a scheduler would see a hung job, not a failed one. They get `grace_s` seconds."""
    me = threading.current_thread()
    deadline = time.monotonic() + grace_s
    for t in threading.enumerate():
        if t is not me and not t.daemon:
            # the base class's join: orbax's thread classes raise TimeoutError from theirs
            threading.Thread.join(t, max(deadline - time.monotonic(), 0.0))
    if any(t.is_alive() and t is not me and not t.daemon for t in threading.enumerate()):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
