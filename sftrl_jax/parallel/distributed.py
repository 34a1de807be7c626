"""Multi-process (multi-host) start-up through `jax.distributed`.

One process per host (GPU node or TPU VM); every process runs the same command. Set either

    SFTRL_COORDINATOR=host0:1234 SFTRL_NUM_PROCESSES=4 SFTRL_PROCESS_ID=<0..3> sftrl sft --config ...

or `train.distributed=true`, which lets JAX detect the cluster (TPU pods, SLURM, Open MPI, GKE).
On CPU (tests) the processes exchange data with gloo collectives.
"""

from __future__ import annotations

import os
import pickle
from typing import Any

import jax
import numpy as np

from sftrl_jax.errors import UserError

_INITIALIZED = False


def maybe_initialize(auto: bool = False) -> bool:
    """Starts `jax.distributed` from the SFTRL_* variables (or cluster auto-detection when `auto`).

    Must run before anything touches the devices. Returns whether this is a multi-process run.
    """
    global _INITIALIZED
    if _INITIALIZED:
        return jax.process_count() > 1
    coordinator = os.environ.get("SFTRL_COORDINATOR")
    if coordinator is None and not auto:
        return False
    kwargs = {}
    if coordinator is not None:
        try:
            kwargs = dict(
                coordinator_address=coordinator,
                num_processes=int(os.environ["SFTRL_NUM_PROCESSES"]),
                process_id=int(os.environ["SFTRL_PROCESS_ID"]),
            )
        except KeyError as e:
            raise UserError(
                f"SFTRL_COORDINATOR is set but {e.args[0]} is not; set all three SFTRL_* variables"
            ) from None
        except ValueError as e:
            raise UserError(f"SFTRL_NUM_PROCESSES and SFTRL_PROCESS_ID must be integers: {e}") from None
    # Only affects collectives between CPU devices (tests, CPU clusters); GPUs/TPUs use their own.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    _INITIALIZED = True
    return jax.process_count() > 1


def process_share() -> tuple[int, int]:
    """(this process's index, the number of processes)."""
    return jax.process_index(), jax.process_count()


def allgather_objects(obj: Any) -> list[Any]:
    """Every process's picklable `obj`, in process order (host all-gathers: the sizes, then the bytes);
    every process must call it. One process: [obj]."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    data = np.frombuffer(pickle.dumps(obj), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.int32(data.size))).reshape(-1)
    n = 1 << int(sizes.max()).bit_length()  # power-of-2 buffers: few distinct shapes to compile
    buf = np.zeros(n, np.uint8)
    buf[: data.size] = data
    rows = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(sizes), n)
    # The bytes are what this job's own processes pickled a moment ago in this function (the host
    # all-gather of one run), never a file, a network peer or model text.
    return [pickle.loads(rows[p, : sizes[p]].tobytes()) for p in range(len(sizes))]  # safe: own processes' bytes
