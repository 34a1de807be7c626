"""Compile a `Program` and read what XLA says about it, per device.

Memory from `compiled.memory_analysis()` (arguments, outputs, temporaries; peak = arguments +
outputs + temporaries - aliased (donated) bytes, XLA's own heap-simulated peak beside it), FLOPs from
`compiled.cost_analysis()` (the SPMD-partitioned module: per device), collectives from the
partitioned HLO text (the bytes of each all-gather / all-reduce / reduce-scatter / all-to-all /
collective-permute result, each op counted once: a loop body's collectives are counted once, not
per iteration). XLA's cost analysis also counts a loop body once: `flops` and `ideal_flops` are per
device and per iteration of the program's main loop (`loop_trips` of them: micro-batches of a
scanned step, decode steps).
"""

from __future__ import annotations

import re
import time

import jax
import numpy as np

FIELDS = (
    "name",
    "compile_s",
    "argument_bytes",
    "output_bytes",
    "temp_bytes",
    "peak_bytes",
    "flops",
    "ideal_flops",
    "collective_bytes",
)
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
    "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}  # fmt: skip
_SHAPE = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128)\[([\d,]*)\]")
_OP = re.compile(r"=\s*(.*?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")


def collectives(hlo: str) -> dict[str, int]:
    """Result bytes per collective kind in an HLO module's text (`-done` halves not counted twice)."""
    out = dict.fromkeys(COLLECTIVES, 0)
    for line in hlo.splitlines():
        m = _OP.search(line)
        if not m:
            continue
        shapes = _SHAPE.findall(m.group(1))
        if m.group(3) and len(shapes) > 1:  # an async start's tuple holds (operands..., results...)
            shapes = shapes[len(shapes) // 2 :]
        out[m.group(2)] += sum(
            _DTYPE_BYTES.get(t, 4) * int(np.prod([int(d) for d in dims.split(",") if d])) for t, dims in shapes
        )
    return out


def analyse(program) -> dict:
    """Lower and compile `program` on its mesh; one row of FIELDS (+ `collectives` by kind)."""
    t0 = time.perf_counter()
    with jax.set_mesh(program.mesh):
        compiled = program.fn.lower(*program.args).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    arg = int(getattr(mem, "argument_size_in_bytes", 0))
    out = int(getattr(mem, "output_size_in_bytes", 0))
    temp = int(getattr(mem, "temp_size_in_bytes", 0))
    alias = int(getattr(mem, "alias_size_in_bytes", 0))
    # Peak: everything live at once (an upper bound: donated inputs counted once); XLA's own heap
    # simulation, where the backend reports one, beside it.
    peak = arg + out + temp - alias
    xla_peak = int(getattr(mem, "peak_memory_in_bytes", 0) or 0)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
    by_kind = collectives(compiled.as_text())
    analytic = None
    if program.analytic is not None:
        from sftrl_jax.planning import memory

        analytic = memory.train_step_bytes(argument_bytes=arg, **program.analytic)
    return {
        "name": program.name,
        "compile_s": round(compile_s, 2),
        "argument_bytes": arg,
        "output_bytes": out,
        "temp_bytes": temp,
        "peak_bytes": peak,
        "xla_peak_bytes": xla_peak,
        "analytic_peak_bytes": analytic,
        "flops": float(cost.get("flops", 0.0)),
        "ideal_flops": program.ideal_flops,
        "loop_trips": program.loop_trips,
        "collective_bytes": int(sum(by_kind.values())),
        "collectives": by_kind,
    }


def export_for(program, platform: str) -> str:
    """`jax.export` of the program for `platform` ('cuda' or 'tpu'); returns the serialised module's
    custom-call targets (so a CPU-only call leaking in shows). Raises if it does not export."""
    with jax.set_mesh(program.mesh):
        exported = jax.export.export(program.fn, platforms=(platform,))(*program.args)
    text = exported.mlir_module()
    targets = sorted(
        set(re.findall(r"custom_call_target\s*=\s*\"([^\"]+)\"", text))
        | set(re.findall(r"stablehlo.custom_call @([\w.]+)", text))
    )
    return ",".join(targets)
