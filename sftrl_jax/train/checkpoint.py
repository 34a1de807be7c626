"""Checkpoints (orbax `CheckpointManager`): async, keep-N, interval, auto-resume, SIGTERM-safe.

A checkpoint holds two items: `state`, a pytree of arrays (params, optimiser state, step, RNG key
data) restored directly into the shardings of an abstract target, and `extra`, JSON (data iterator
state, rollout/env state, anything host-side). Typed PRNG keys are stored as their raw key data.

    ckpt = Checkpointer(run_dir / "checkpoints", keep=3, every=100)
    step, state, extra = ckpt.restore_latest(abstract_state)   # (None, None, None) on a fresh run
                                                               # (the newest one that restores)
    ...
    ckpt.maybe_save(step, state, extra)                        # saves every `every` steps
    ckpt.check()                                               # SaveError if a background save failed
    snapshot_path(run_dir, step, every=snapshot_every)         # <run_dir>/snapshots/<step> or None
    with PreemptionGuard() as guard:                           # SIGTERM -> guard.requested
        ...

Atomic: orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames it when complete, so a
kill at any point leaves the earlier steps and at most an unfinished temporary folder, which is not a
step (orbax ignores it, and removes it when that step is saved again). A save that fails (disk full,
permissions) raises `SaveError` with one line naming the step's folder and the cause, at the next
`check()` / `save()` / `wait()` / `close()` after the failure; the earlier checkpoints are kept. A
checkpoint that does not restore is told apart by what is wrong: its tree or shapes differ from the
run's state (another model or optimiser config) or its files are damaged (truncated, corrupted).
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp

from sftrl_jax import errors
from sftrl_jax.errors import SaveError, UserError
from sftrl_jax.models import checkpoint as model_ckpt


class Checkpointer:
    """Saves and restores (state pytree, extra JSON) pairs by step."""

    def __init__(self, directory: str | os.PathLike, *, keep: int | None = 3, every: int = 1, async_save: bool = True):
        self.directory = os.path.abspath(os.fspath(directory))
        model_ckpt.quiet_orbax_errors()  # a failed save is one line (SaveError), not orbax's tracebacks
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=max(int(every), 1),
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "extra"))
        self._pending: int | None = None  # the step of a save that may still be writing
        self._failed: SaveError | None = None
        self._closed = False

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, extra: dict[str, Any] | None = None, *, force: bool = True) -> bool:
        """Saves now (or, with force=False, only on the interval). Async: returns before the write ends.
        SaveError if this save, or the previous one still writing, fails."""
        step = int(step)
        if not force and not self.manager.should_save(step):
            return False
        self.wait()  # a failure of the previous save is reported against its own step
        try:
            saved = self.manager.save(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra or {})),
                force=force,
            )
        except Exception as e:  # any failure of a save ends the run with one line
            raise self._fail(step, e) from None
        if saved:
            self._pending = step
        return saved

    def maybe_save(self, step: int, state: Any, extra: dict[str, Any] | None = None) -> bool:
        return self.save(step, state, extra, force=False)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """Restores `step` into the shapes, dtypes and shardings of `abstract_state`."""
        if step not in self.manager.all_steps():
            raise UserError(f"no checkpoint for step {step} in {self.directory} (have {self.all_steps()})")
        target = jax.tree.map(_as_abstract, abstract_state)
        try:
            out = self.manager.restore(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardRestore(target), extra=ocp.args.JsonRestore()),
            )
        except Exception as e:  # tensorstore raises plain Exception on a damaged file
            raise UserError(
                model_ckpt.restore_problem(
                    f"checkpoint {self.directory}/{step}",
                    e,
                    against="this run's state",
                    hint=" (a different model or optimiser config?)",
                )
            ) from None
        return out["state"], dict(out["extra"] or {})

    def restore_latest(
        self, abstract_state: Any, *, log: Callable[[str], None] = print
    ) -> tuple[int | None, Any, dict[str, Any] | None]:
        """The newest checkpoint that restores, as (step, state, extra); (None, None, None) if none exist.

        A checkpoint that does not restore (a truncated or corrupted file, a half-written step on a
        filesystem without atomic renames) is skipped, with a line through `log` saying which and why.
        Once an older one restores, the skipped ones are moved to `<directory>.skipped/` (never
        deleted): orbax would otherwise keep them as the latest steps and refuse to save those steps
        again. If none restores, nothing is moved and the error names every step and its reason."""
        failures: list[tuple[int, str]] = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                state, extra = self.restore(step, abstract_state)
            except Exception as e:  # tensorstore raises plain Exception on a corrupted array file
                why = _reason(e)
                log(f"checkpoint: skipping step {step} of {self.directory}: it does not restore ({why})")
                failures.append((step, why))
                continue
            if failures:
                self._set_aside([s for s, _ in failures], log=log)
            return step, state, extra
        if failures:
            reasons = "; ".join(f"step {s}: {why}" for s, why in failures)
            raise UserError(
                f"no checkpoint in {self.directory} restores ({reasons}); nothing was deleted: move the folder "
                "away to start afresh, or fix the run's config if it changed"
            )
        return None, None, None

    def _set_aside(self, steps: list[int], *, log: Callable[[str], None]) -> None:
        aside = self.directory.rstrip(os.sep) + ".skipped"
        if jax.process_index() == 0:
            os.makedirs(aside, exist_ok=True)
            for step in steps:
                src, dst = os.path.join(self.directory, str(step)), os.path.join(aside, str(step))
                n = 1
                while os.path.exists(dst):  # a step skipped before, on an earlier resume
                    dst, n = os.path.join(aside, f"{step}.{n}"), n + 1
                shutil.move(src, dst)
                log(f"checkpoint: moved the skipped step {step} to {dst} (kept, not deleted)")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("sftrl checkpoints set aside")
        self.manager.reload()

    def check(self) -> None:
        """SaveError if a save that was writing in the background has failed; never blocks. The loops
        call it after every step, so a failed save stops the run at once, not at the next save. In a
        multi-process run it waits for the next save (where every process waits), so that all the
        processes stop at the same point."""
        if self._failed is not None:
            raise self._failed
        if self._pending is None or jax.process_count() > 1 or self.manager.is_saving_in_progress():
            return
        self.wait()

    def wait(self) -> None:
        """Blocks until pending async saves are on disk; SaveError if one failed."""
        if self._failed is not None:
            raise self._failed
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # what failed in the background
            raise self._fail(self._pending, e) from None
        self._pending = None

    def close(self) -> None:
        """Waits for pending saves (SaveError if one failed), then closes. After a failed save it
        returns at once: orbax's writer threads may still be waiting on the failed save, and waiting
        for them would hang the process (the CLI ends it without them, `cli.main`)."""
        if self._closed:
            return
        self._closed = True
        if self._failed is not None:
            return
        self.wait()
        self.manager.close()

    def _fail(self, step: int | None, e: BaseException) -> SaveError:
        where = self.directory if step is None else os.path.join(self.directory, str(step))
        self._failed = SaveError(
            f"checkpoint save to {where} failed: {errors.cause(e)} (the checkpoints before it are kept; "
            "the same command resumes from the latest)"
        )
        return self._failed

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


SNAPSHOTS_DIR = "snapshots"


def snapshot_path(run_dir: str, step: int, *, every: int) -> str | None:
    """Where the loop writes the model at `step` (`train.snapshot_every` = `every`): a model checkpoint
    `<run_dir>/snapshots/<step>`, as `<run_dir>/final` (`sftrl eval --ckpt` loads it), every `every`
    steps but never at step 0; None when no snapshot is due (or `every` is 0). Snapshots are not
    rotated like the training checkpoints: they are the run's evaluation points."""
    if every <= 0 or step <= 0 or step % every:
        return None
    return os.path.join(run_dir, SNAPSHOTS_DIR, str(int(step)))


def _reason(e: BaseException) -> str:
    """One line (at most 300 characters) saying why a restore failed."""
    text = " ".join(str(e).split())
    text = text if isinstance(e, UserError) else f"{type(e).__name__}: {text}"
    return text if len(text) <= 300 else text[:297] + "..."


def _as_abstract(x: Any) -> Any:
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x


class PreemptionGuard:
    """Turns SIGTERM (a scheduler's preemption notice) into a flag the training loop polls.

    The loop saves a checkpoint and exits 0 when `requested` is set; a second SIGTERM while saving is
    ignored. Outside the main thread (e.g. a notebook worker) it installs nothing.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self.signals = signals
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()
