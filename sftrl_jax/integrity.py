"""Shipped assets are the recorded bytes: a folder's sha256 record, checked whenever the folder loads.

A folder records `{"sha256": {file name: hex digest}}` in one of `RECORDS`: the study base
(`data/assets/gp_l_base/base.json`, written by tools/ship_base.py) and the small tokenizer
(`data/assets/tokenizer/sha256.json`, tools/make_tokenizer.py). `verify_folder` hashes every recorded
file and refuses a mismatch in one line naming the file, the recorded digest and the actual one, so a
flipped bit or NaN bytes in `model.safetensors` stop the load instead of reaching a study. A copy of
the folder carries its record and is checked the same way; a folder without a record is not checked.
A file that verified is remembered by (path, size, mtime) for the process: ~10 MB hash in ~20 ms once.
`read_json` reads a record, or any JSON file a loader is given, with a one-line error naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from sftrl_jax.errors import UserError

RECORDS = ("base.json", "sha256.json")
_verified: set[tuple[str, int, int, str]] = set()


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_json(path: str, *, what: str = "invalid JSON") -> Any:
    """The JSON value of a file; a one-line UserError `"{path}: {what} (the cause)"` when it cannot
    be read, is not UTF-8, not JSON, or nests too deep for Python's parser."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, RecursionError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError included
        raise UserError(f"{path}: {what} ({type(e).__name__}: {e})") from None


def recorded_digests(folder: str) -> dict[str, str]:
    """{file name: sha256} of the folder's record (empty when it has none)."""
    out: dict[str, str] = {}
    for name in RECORDS:
        record = os.path.join(folder, name)
        if not os.path.isfile(record):
            continue
        data = read_json(record, what="not a readable sha256 record")
        digests = data.get("sha256") if isinstance(data, dict) else None
        if digests is None and name == "base.json":
            continue  # a study's run folder has a base.json of another kind (no sha256)
        if not isinstance(digests, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and len(v) == 64 for k, v in digests.items()
        ):
            raise UserError(f"{record}: 'sha256' must map file names to 64-digit hex digests")
        out.update(digests)
    return out


def verify_folder(folder: str | os.PathLike) -> None:
    """Every file the folder's record names has its recorded sha256 (UserError naming the first that
    does not)."""
    folder = os.fspath(folder)
    for name, want in sorted(recorded_digests(folder).items()):
        path = os.path.join(folder, name)
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            raise UserError(f"{path}: missing, but the folder's sha256 record lists it") from None
        key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns, want.lower())
        if key in _verified:
            continue
        got = sha256_of(path)
        if got != want.lower():
            raise UserError(
                f"{path}: sha256 is {got}, expected {want.lower()} (the folder's record): the file is damaged "
                "or was changed; restore it (e.g. reinstall the package)"
            )
        _verified.add(key)
