"""Compile a `Program` and read what XLA says about it, per device.

Memory from `compiled.memory_analysis()` (arguments, outputs, temporaries; peak = arguments +
outputs + temporaries - aliased (donated) bytes, XLA's own heap-simulated peak beside it), FLOPs from
the compiled (SPMD-partitioned: per device) HLO module's matrix products (`hlo_flops`: 2 x result
elements x contracted size of every dot), each loop body counted as many times as the loop's trip
count when XLA knows it (scans: micro-batches, layers with `model.scan_layers`, log-prob chunks) and
once when only the run knows it (the decode loop, the filled-block attention loop): train steps and
passes are counted whole, a decode program per decode step. (`cost_analysis()` counts every loop
body once, which a scan over the layers turns into one layer's worth; its figure is `xla_flops`.)
Collectives from the same text and with the same loop counting: the bytes of each all-gather /
all-reduce / reduce-scatter / all-to-all / collective-permute result.
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


def _collective_bytes(line: str) -> tuple[str, int] | None:
    """(kind, result bytes) of a collective instruction line (`-done` halves not counted twice)."""
    m = _OP.search(line)
    if not m:
        return None
    shapes = _SHAPE.findall(m.group(1))
    if m.group(3) and len(shapes) > 1:  # an async start's tuple holds (operands..., results...)
        shapes = shapes[len(shapes) // 2 :]
    return m.group(2), sum(
        _DTYPE_BYTES.get(t, 4) * int(np.prod([int(d) for d in dims.split(",") if d])) for t, dims in shapes
    )


def collectives(hlo: str) -> dict[str, int]:
    """Result bytes per collective kind in an HLO module's text, loops counted by their trip
    counts as in `hlo_totals`."""
    return _collectives_of(hlo_totals(hlo))


def _collectives_of(totals: dict[str, float]) -> dict[str, int]:
    return {k: int(totals[k]) for k in COLLECTIVES}


_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\((.*)\)\s*->.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.+?)\s+([\w\-]+)\((.*)$")
_HEADER_PARAM = re.compile(r"([\w.\-]+):\s*((?:pred|[suf]\d+|bf16|c64|c128)\[[\d,]*\])")
_CALLEE = re.compile(r"\b(calls|to_apply|body|condition|true_computation|false_computation)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _dims(shape: str) -> list[int]:
    m = _SHAPE.search(shape)
    return [int(d) for d in m.group(2).split(",") if d] if m else []


def hlo_flops(hlo: str) -> float:
    """Matrix-product FLOPs of an HLO module's text (see `hlo_totals`)."""
    return hlo_totals(hlo)["flops"]


def hlo_totals(hlo: str) -> dict[str, float]:
    """{"flops", and result bytes per collective kind} of an HLO module's text, from the entry
    computation with calls followed: each dot's 2 x result elements x contracted size, each
    collective's result bytes; a while body times its `known_trip_count` (once if XLA does not know
    it), a conditional's costliest branch (by FLOPs)."""
    bodies: dict[str, list[str]] = {}
    headers: dict[str, str] = {}
    entry, current = None, None
    for line in hlo.splitlines():
        m = _COMPUTATION.match(line)
        if m:
            current = m.group(1)
            bodies[current], headers[current] = [], m.group(2)
            if line.startswith("ENTRY"):
                entry = current
        elif current is not None and line.strip() == "}":
            current = None
        elif current is not None:
            bodies[current].append(line)
    keys = ("flops",) + COLLECTIVES
    memo: dict[str, np.ndarray] = {}

    def cost(name: str) -> np.ndarray:
        if name in memo:
            return memo[name]
        memo[name] = np.zeros(len(keys))  # no recursion in HLO; guards a malformed module
        shapes = {p: s for p, s in _HEADER_PARAM.findall(headers.get(name, ""))}
        total = np.zeros(len(keys))
        for line in bodies.get(name, ()):
            m = _INSTRUCTION.match(line)
            if not m:
                continue
            result, shape, op, rest = m.groups()
            shapes[result] = shape
            if op == "dot":
                operands = re.findall(r"%([\w.\-]+)", rest.split(")")[0])
                lhs = _dims(shapes.get(operands[0], "")) if operands else []
                contract = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
                k = int(np.prod([lhs[int(i)] for i in contract.group(1).split(",") if i])) if contract and lhs else 1
                total[0] += 2.0 * float(np.prod(_dims(shape))) * k
            coll = _collective_bytes(line)
            if coll:
                total[keys.index(coll[0])] += coll[1]
            callees = _CALLEE.findall(rest)
            if op == "while":
                trip = _TRIP.search(rest)
                n = int(trip.group(1)) if trip else 1
                total += n * sum((cost(c) for kind, c in callees if kind in ("body", "condition")), np.zeros(len(keys)))
                continue
            if op == "conditional":
                branches = re.findall(r"%([\w.\-]+)", (_BRANCHES.search(rest) or [None, ""])[1])
                branches += [c for kind, c in callees if kind.endswith("_computation")]
                if branches:
                    total += max((cost(c) for c in branches), key=lambda v: v[0])
                continue
            total += sum((cost(c) for kind, c in callees if kind in ("calls", "to_apply")), np.zeros(len(keys)))
        memo[name] = total
        return total

    out = cost(entry) if entry else np.zeros(len(keys))
    return dict(zip(keys, (float(v) for v in out)))


# XLA:CPU has no bf16 matrix product: it converts bf16 operands to f32 inside the loop body, and its
# loop-invariant code motion then hoists the convert of a whole stacked weight out of the layer scan
# or the decode loop, so one f32 copy of every bf16 weight stack lives through the program (2x the
# bf16 weights). An accelerator multiplies bf16 natively and has no such copy. The planner compiles
# without that pass (a loop body then converts one layer's slice at a time, as an accelerator never
# needs to); `hoist=True` keeps XLA:CPU's default (the figures of the tables before 2026-12-08).
NO_HOIST = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}


def analyse(program, *, hoist: bool = False) -> dict:
    """Lower and compile `program` on its mesh; one row of FIELDS (+ `collectives` by kind)."""
    t0 = time.perf_counter()
    with jax.set_mesh(program.mesh):
        compiled = program.fn.lower(*program.args).compile(compiler_options=None if hoist else NO_HOIST)
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
    totals = hlo_totals(compiled.as_text())
    by_kind = _collectives_of(totals)
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
        "flops": totals["flops"],
        "xla_flops": float(cost.get("flops", 0.0)),
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
