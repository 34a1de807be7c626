"""Model checkpoints in our own format: an orbax checkpoint of the parameters plus our config JSON.

    CKPT/model_config.json   our config (every field, including the semantics flags) + param dtype
    CKPT/params/             orbax StandardCheckpointer tree, same structure as `nnx.state(model)`

`sftrl convert` writes one from an HF folder, `sftrl export` turns one back into an HF folder, and
`load_checkpoint` restores one straight into the shardings of a mesh.

Saves are atomic: everything goes to `CKPT.partial` first, which is renamed to `CKPT` once complete
(an older `CKPT` is moved to `CKPT.old` for the swap, then deleted). A kill at any point leaves `CKPT`
complete or absent (the training loops then write it again from their last checkpoint), never half
written; `is_checkpoint` (model_config.json present) is therefore a complete checkpoint, and the next
save to `CKPT` removes a leftover `CKPT.partial` / `CKPT.old`. A failed save raises `SaveError`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from sftrl_jax import errors
from sftrl_jax.errors import SaveError, UserError
from sftrl_jax.models import build, stacking
from sftrl_jax.models import config as config_lib

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"
PARTIAL, OLD = ".partial", ".old"  # suffixes of the folders of an atomic save (see the module doc)
# A run saves its tokenizer beside the model (`save_checkpoint(..., extra=...)`), so that `sftrl eval
# --ckpt` and `sftrl rl model.init=` read the checkpoint with the tokenizer it was trained with.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
)


def is_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_FILE))


def read_checkpoint_config(path: str) -> tuple[config_lib.ModelConfig, str]:
    """(config, stored parameter dtype name) of a checkpoint folder."""
    file = os.path.join(path, CONFIG_FILE)
    try:
        with open(file, encoding="utf-8") as f:
            d = json.load(f)
    except FileNotFoundError:
        unfinished = os.path.isdir(path.rstrip(os.sep) + PARTIAL)
        hint = f" (an unfinished save is in {path.rstrip(os.sep)}{PARTIAL}: rerun what writes it)" if unfinished else ""
        raise UserError(f"{path}: not a sftrl_jax model checkpoint (no {CONFIG_FILE}){hint}") from None
    except (ValueError, RecursionError) as e:  # invalid JSON or UTF-8
        raise UserError(f"{file}: invalid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict):
        raise UserError(f"{file}: must be a JSON object, got a {type(d).__name__}")
    dtype = d.pop("param_dtype", "float32")
    try:
        return config_lib.from_dict(d), dtype
    except UserError as e:
        raise UserError(f"{file}: {e}") from None


def save_checkpoint(model: nnx.Module, path: str, *, extra: Callable[[str], None] | None = None) -> None:
    """Write `model`'s parameters (any sharding; every process calls this) and config to `path`,
    atomically (the module doc); an existing model checkpoint at `path` is replaced (a folder with
    other files is refused). `extra(folder)` writes more files into the checkpoint before it is
    complete (a run's tokenizer: `TOKENIZER_FILES`). SaveError when a write fails."""
    path = os.path.abspath(path).rstrip(os.sep)
    tmp, old = path + PARTIAL, path + OLD
    lead = jax.process_index() == 0
    state = nnx.state(model, nnx.Param)
    leaves = jax.tree.leaves(state)
    dtype = np.dtype(leaves[0].dtype).name if leaves else "float32"
    if os.path.isdir(path):  # replaced whole: only a model checkpoint (complete or not) may be there
        others = sorted(set(os.listdir(path)) - {PARAMS_DIR, CONFIG_FILE, *TOKENIZER_FILES})
        if others:
            more = ", ..." if len(others) > 3 else ""
            raise UserError(
                f"{path} holds files that are not a model checkpoint's ({', '.join(others[:3])}{more}); "
                "save the model to a new or empty folder"
            )
    elif os.path.lexists(path):
        raise UserError(f"{path} exists and is not a folder; save the model to a new or empty folder")
    quiet_orbax_errors()
    try:
        if lead:  # what a killed save left behind
            for leftover in (tmp, old):
                if os.path.lexists(leftover):
                    shutil.rmtree(leftover)
        _sync("sftrl model save: start")
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(os.path.join(tmp, PARAMS_DIR), nnx.to_pure_dict(state), force=True)
        ckptr.wait_until_finished()
        if lead:
            if extra is not None:
                extra(tmp)
            with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
                json.dump({**config_lib.to_dict(model.config), "param_dtype": dtype}, f, indent=2)
                f.flush()
                os.fsync(f.fileno())
            if os.path.lexists(path):
                os.rename(path, old)
            os.rename(tmp, path)
            _fsync_dir(os.path.dirname(path))
            if os.path.lexists(old):
                shutil.rmtree(old)
    except Exception as e:  # any failure of a save: one line (the writer threads are not waited for)
        raise SaveError(f"model save to {path} failed: {errors.cause(e)}") from None
    ckptr.close()
    _sync("sftrl model save: done")


class _OneLineOrbaxErrors(logging.Filter):
    """Orbax logs a failed save from each of its writer threads, each with a traceback and the full
    tensorstore spec (hundreds of lines for one full disk); `SaveError` reports it in one line. Its
    records keep their first 300 characters and lose the traceback (`SFTRL_ORBAX_TRACEBACKS=1` keeps
    them whole)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in (record.pathname or ""):
            try:
                text = " ".join(record.getMessage().split("[tensorstore_spec")[0].split())
            except Exception:  # a record that does not format: left as it is
                return True
            record.msg, record.args = (text if len(text) <= 300 else text[:297] + "..."), ()
            record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


def quiet_orbax_errors() -> None:
    """Installs `_OneLineOrbaxErrors` on absl's logger (once; not with SFTRL_ORBAX_TRACEBACKS=1)."""
    logger = logging.getLogger("absl")
    if os.environ.get("SFTRL_ORBAX_TRACEBACKS") == "1" or any(
        isinstance(f, _OneLineOrbaxErrors) for f in logger.filters
    ):
        return
    logger.addFilter(_OneLineOrbaxErrors())


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(
    path: str,
    *,
    mesh: jax.sharding.Mesh | None = None,
    dtype=None,
    compute_dtype=None,
    remat: bool = False,
    scan_layers: bool = False,
    config: config_lib.ModelConfig | None = None,
) -> nnx.Module:
    """Restore a checkpoint written by `save_checkpoint` / `sftrl convert`.

    Each parameter is read directly into its sharding on `mesh` (default: one device). `dtype`
    (default: as stored) casts the parameters; `config` may replace the stored one (same shapes).
    `scan_layers`: the model's layer stacks stored stacked; a checkpoint of the other layout is
    restored as stored, then stacked or unstacked on the devices parameter by parameter.
    """
    path = os.path.abspath(path)
    stored, stored_dtype = read_checkpoint_config(path)
    config = stored if config is None else config
    param_dtype = jnp.dtype(dtype if dtype is not None else stored_dtype)
    stored_stacked = _stored_stacked(os.path.join(path, PARAMS_DIR))
    stored_stacked = scan_layers if stored_stacked is None else stored_stacked

    def abstract(stacked: bool):
        model = build.abstract_model(
            config, param_dtype=param_dtype, dtype=compute_dtype, remat=remat, scan_layers=stacked
        )
        return nnx.split(model)

    graphdef, abstract_state = abstract(stored_stacked)
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=device), abstract_state)
    else:
        shardings = build.shardings(abstract_state, mesh)
        target = jax.tree.map(
            lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), abstract_state, shardings
        )
    try:
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(os.path.join(path, PARAMS_DIR), nnx.to_pure_dict(target))
    except Exception as e:  # tensorstore raises plain Exception on a damaged file
        raise UserError(restore_problem(os.path.join(path, PARAMS_DIR), e, against="this config")) from None
    nnx.replace_by_pure_dict(abstract_state, restored)
    if stored_stacked != scan_layers:
        graphdef, target = abstract(scan_layers)
        abstract_state = stacking.relayout(abstract_state, target, mesh=mesh, consume=True)
    return nnx.merge(graphdef, abstract_state)


def _stored_stacked(params_dir: str) -> bool | None:
    """Whether a checkpoint's parameters are stored stacked (`stacking`), from orbax's metadata; None
    when it cannot be read (the restore then says what is wrong)."""
    try:
        with ocp.StandardCheckpointer() as ckptr:
            tree = ckptr.metadata(params_dir).item_metadata
        leaves = jax.tree_util.tree_flatten_with_path(getattr(tree, "tree", tree))[0]
    except Exception:  # a missing or damaged checkpoint: reported by the restore
        return None
    return stacking.is_stacked(build.path_str(p) for p, _ in leaves)


_MISMATCH = ("tree structures do not match", "is not compatible with the stored shape")


def restore_problem(what: str, e: BaseException, *, against: str, hint: str = "") -> str:
    """One line on why `what` (an orbax checkpoint) did not restore: it does not match `against` (orbax
    compared its tree and shapes with the target's; `hint` follows), or they match and its files are
    damaged."""
    text = str(e)
    if not any(m in text for m in _MISMATCH):
        return f"{what} is damaged (truncated or corrupted files?): {errors.cause(e)}"
    # orbax lists each differing key as "key:\n - Source: <the target's>\n - Target: <on disk>"
    only_ckpt = re.findall(r"^(\S+):\n\s+- Source: MISSING", text, flags=re.M)
    only_target = re.findall(r"^(\S+):\n\s+- Source: [^\n]*\n\s+- Target: MISSING", text, flags=re.M)
    parts = [
        f"{len(keys)} {side}: {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}"
        for keys, side in ((only_ckpt, "only in the checkpoint"), (only_target, f"only in {against}"))
        if keys
    ]
    detail = "; ".join(parts) or " ".join(text.split("Truncating/padding")[0].split())
    return f"{what} does not match {against}{hint}: {detail}"
