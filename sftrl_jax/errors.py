"""Errors a user can cause. Commands catch `UserError` and print its message without a traceback."""

from __future__ import annotations

import os
import re


class UserError(ValueError):
    """Bad user input (a file, key, shape or value); the message names what is wrong."""


class SaveError(UserError):
    """A checkpoint or model save failed (disk full, permissions, a vanished folder): the run stops at
    once with one line naming the folder and the cause; what was saved before is kept. Writer threads
    of the failed save may still wait on it (orbax), so the CLI ends the process without waiting."""


def cause(e: BaseException, *, limit: int = 300) -> str:
    """Why an I/O operation failed, in one line: the operating system's error where there is one
    (`[Errno 28] No space left on device`, also out of a tensorstore message or a chained exception),
    else the exception's text on one line (at most `limit` characters)."""
    seen, x = set(), e
    while x is not None and id(x) not in seen:
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno:
            return f"[Errno {x.errno}] {x.strerror or os.strerror(x.errno)}"
        m = _OS_CODE.search(str(x))
        if m and int(m.group(1)):
            code = int(m.group(1))
            return f"[Errno {code}] {os.strerror(code)}"
        x = x.__cause__ or x.__context__
    text = " ".join(str(e).split("[tensorstore_spec")[0].split())
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


_OS_CODE = re.compile(r"os_error_code='?(\d+)")
