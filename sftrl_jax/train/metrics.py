"""Metrics: one JSON object per line (always), TensorBoard scalars (optional, if tensorboardX is installed),
Weights & Biases (optional, `pip install 'sftrl_jax[wandb]'`; what the reference logs to).

    with MetricsWriter(run_dir, tensorboard=True, wandb=True, config=config_lib.to_dict(cfg)) as log:
        log.write(step, {"loss": 1.2, "lr": 1e-6}, prefix="train")

W&B runs offline unless WANDB_API_KEY or WANDB_MODE is set, so a run never needs the network: the
offline run lies in `<run_dir>/wandb/offline-run-*` (`wandb sync <that folder>` uploads it later).

`read_jsonl(path)` loads a metrics file back (for reports and notebooks). A resumed run first calls
`rewind(path, checkpoint_step=k)`, so that the steps re-run after the checkpoint appear once.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import string
import time
from typing import Any

import numpy as np

from sftrl_jax.config import ConfigError


def _scalar(v: Any) -> Any:
    if isinstance(v, np.generic | np.ndarray) or hasattr(v, "__array__"):
        a = np.asarray(v)
        if a.size == 1:
            v = a.item()
        else:
            return a.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep them visible as strings
    return v


def rewind(path: str | os.PathLike, *, checkpoint_step: int | None) -> int:
    """Makes the jsonl file at `path` end at the checkpoint a run resumes from; returns rows removed.

    A run killed after its last checkpoint had logged steps it will log again once resumed (34 rows
    for 30 steps after a SIGKILL). Rows whose `step` is after `checkpoint_step` (all rows with a
    `step` when it is None: a run starting afresh) and a truncated last line are moved, as they were,
    to `<name>.rewound.jsonl` beside the file: nothing is lost and readers see each step once."""
    path = os.fspath(path)
    if not os.path.exists(path):
        return 0
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    keep, removed = [], []
    for line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            removed.append(line)  # a line cut by the kill
            continue
        step = row.get("step") if isinstance(row, dict) else None
        stale = isinstance(step, int) and (checkpoint_step is None or step > checkpoint_step)
        (removed if stale else keep).append(line)
    if not removed:
        return 0
    root, ext = os.path.splitext(path)
    with open(f"{root}.rewound{ext}", "a", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in removed))
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in keep))
    os.replace(tmp, path)  # atomic: a kill now leaves the old or the new file, never half of one
    return len(removed)


WANDB_ID_FILE = "wandb_id.txt"  # in the run folder: a resumed run continues the same W&B run


def require_wandb():
    """The wandb module, or a ConfigError naming `train.wandb` and the install command."""
    try:
        import wandb
    except ImportError:
        raise ConfigError("train.wandb=true needs wandb: pip install 'sftrl_jax[wandb]'") from None
    return wandb


def _wandb_init(run_dir: str, *, project: str, name: str | None, config: dict[str, Any] | None):
    wandb = require_wandb()
    id_path = os.path.join(run_dir, WANDB_ID_FILE)
    if os.path.exists(id_path):
        with open(id_path) as f:
            run_id = f.read().strip()
    else:
        # W&B's own ids: 8 characters of [a-z0-9] (its generator moved between releases)
        run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        with open(id_path, "w") as f:
            f.write(run_id + "\n")
    # offline unless asked otherwise: a run on a machine without network or W&B account still logs
    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    return wandb.init(
        dir=run_dir,
        project=project,
        name=name or os.path.basename(os.path.normpath(run_dir)),
        config=config,
        mode=mode,
        id=run_id,
        resume="allow",
    )


class MetricsWriter:
    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        filename: str = "metrics.jsonl",
        tensorboard: bool = False,
        wandb: bool = False,
        wandb_project: str = "sftrl",
        wandb_name: str | None = None,
        config: dict[str, Any] | None = None,
    ):
        """`wandb`: also log to Weights & Biases (module docstring), as project `wandb_project`, run
        `wandb_name` (default: the run folder's name), with `config` (the run's config as a dict)."""
        self.run_dir = os.fspath(run_dir)
        os.makedirs(self.run_dir, exist_ok=True)
        self.path = os.path.join(self.run_dir, filename)
        self._f = open(self.path, "a")  # append: a resumed run continues the same file
        self._tb = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                print("metrics: tensorboardX is not installed; writing jsonl only (pip install tensorboardX)")
            else:
                self._tb = SummaryWriter(os.path.join(self.run_dir, "tb"))
        self._wandb = None
        if wandb:
            try:
                self._wandb = _wandb_init(self.run_dir, project=wandb_project, name=wandb_name, config=config)
            except BaseException:
                self.close()
                raise

    def write(self, step: int, metrics: dict[str, Any], *, prefix: str | None = None) -> dict[str, Any]:
        row = {"step": int(step), "time": round(time.time(), 3)}
        for k, v in metrics.items():
            key = f"{prefix}/{k}" if prefix else k
            row[key] = _scalar(v)
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()
        # the numeric figures; non-finite ones are strings in `row` (_scalar) and stay out
        scalars = {k: v for k, v in row.items() if k not in ("step", "time") and isinstance(v, int | float)}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, int(step))
        if self._wandb is not None:
            self._wandb.log(scalars, step=int(step))
        return row

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All rows of a jsonl file; a truncated last line (a killed run) is skipped, others must parse."""
    rows = []
    with open(path) as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}:{i + 1}: not valid JSON: {e}") from None
    return rows


_PEAK: dict[str, float] = {}


def peak_flops(n: int = 1024, repeats: int = 5, dtype: str = "float32") -> float:
    """Measured matmul FLOP/s of one device of this machine (cached): the denominator of MFU.

    Taken as the best of `repeats` timed [n, n] @ [n, n] products after a warm-up compile, over
    the products the ops seam may run on this backend (`ops.peak_products`: XLA's dot and, for fp32
    on a CPU with the OpenBLAS kernel built, that kernel too): the steps run their products on it,
    and XLA's dot alone measured 112-139 GF/s here where the kernel's products run at ~150, which
    made MFU exceed 100%.
    """
    key = f"{n}:{dtype}"
    if key not in _PEAK:
        import jax.numpy as jnp

        from sftrl_jax import ops

        a = jnp.ones((n, n), dtype)
        products = ops.peak_products(dtype)
        best = float("inf")
        for f in products:
            f(a).block_until_ready()
            for _ in range(repeats):
                t0 = time.perf_counter()
                f(a).block_until_ready()
                best = min(best, time.perf_counter() - t0)
        _PEAK[key] = 2.0 * n**3 / best
    return _PEAK[key]
