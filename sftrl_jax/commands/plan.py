"""`sftrl plan`: compile every program of a run at its real shapes on N fake CPU devices, no weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys

HELP = "compile a run's programs abstractly on N fake devices: per-device memory, FLOPs, collectives"
EXAMPLES = """examples:
  sftrl plan --config configs/sft/gp_l.yaml model.preset=llama-3.2-11b-vision --mesh data=1,fsdp=8,tensor=1 --devices 8
  sftrl plan --config configs/rl/gp_l.yaml model.init=/ckpts/GP-L-Init --devices 8 --json
  sftrl plan --config configs/rl/gp_l_tiny.yaml --devices 8 --platform tpu

The memory planner: builds the run's model abstractly (model.preset, or a model.init folder that
needs to hold only config.json), then lowers and compiles every program the run would compile at
its configured shapes (SFT: the train step per length bucket; RL: rollout prefill and decode, the
values / old-log-prob pass, the reference pass if any, the update step) on N fake CPU devices.
Per program: compile time, per-device bytes from XLA's memory analysis (arguments, outputs,
temporaries, peak), per-device FLOPs of the compiled program's matrix products (loops with a
trip count XLA knows, such as the micro-batch and layer scans, counted that many times; the decode
program per decode step) next to the ideal (model FLOPs per token x tokens / devices, remat's extra
forward counted), collectives' bytes. --json prints
{"programs": [{"name", "compile_s", "argument_bytes", "output_bytes", "temp_bytes", "peak_bytes",
"flops", "ideal_flops", "collective_bytes"}]}. --platform cuda|tpu also exports each program with
jax.export for that platform (no CPU-only custom call can leak in); with --export-only it skips
the CPU compile and prints {"programs": [{"name", "export_s", "export"}]}: the proof that a run's
programs lower for an accelerator, in the time of a trace. At 11B each program takes minutes to
compile on a small CPU.

What is compiled is what an accelerator would hold, as far as XLA:CPU can show it: attention in blocks
of query rows (`ops.xla.attention_blocked`, a fused kernel's memory; --attention xla traces XLA's
whole score matrices instead), and without XLA:CPU's loop-invariant code motion, which hoists an f32
copy of every bf16 weight stack out of the layer and decode loops (a CPU has no bf16 product; --hoist
keeps it). `--attention xla --hoist` gives the figures of the tables before 2026-12-08.
"""


def add_arguments(parser):
    parser.add_argument(
        "--config", required=True, help="YAML experiment file (configs/sft/*.yaml or configs/rl/*.yaml)"
    )
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides (YAML values)")
    parser.add_argument(
        "--mesh", default=None, help="mesh, e.g. data=1,fsdp=8,tensor=1 (default: the config's train.mesh)"
    )
    parser.add_argument(
        "--devices", type=int, default=8, help=f"fake CPU devices to compile for (default 8, at most {MAX_DEVICES})"
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--platform", choices=("cuda", "tpu"), default=None, help="also jax.export for this platform")
    parser.add_argument("--images", type=int, default=None, help="image slots per row (default: from the task / data)")
    parser.add_argument("--only", default=None, help="compile only programs whose name contains this")
    parser.add_argument(
        "--export-only", action="store_true", help="with --platform: export each program, compile nothing"
    )
    parser.add_argument(
        "--hoist",
        action="store_true",
        help="keep XLA:CPU's loop-invariant code motion (it holds f32 copies of whole bf16 weight stacks, "
        "which an accelerator has not; the planner's figures before 2026-12-08)",
    )
    parser.add_argument(
        "--attention",
        choices=("blocked", "xla"),
        default="blocked",
        help="attention as a fused kernel's memory (blocked, default) or XLA's whole score matrices (xla: "
        "the figures before 2026-12-08)",
    )
    parser.add_argument("--limit-gib", type=float, default=80.0, help="per-device memory to check peaks against")


# Fake devices are real XLA:CPU devices of this one process: 4096 take ~10 s and ~0.6 GB to create
# (8192: ~35 s, 1 GB; it grows faster than linearly), and every program is then partitioned that many
# ways. 4096 is a TPU v4 pod; a larger run is planned at the same model-parallel shape (fsdp x tensor
# per replica) with fewer data-parallel replicas, which changes no per-device figure but the
# gradient all-reduce's.
MAX_DEVICES = 4096


def _gib(n: float) -> str:
    return f"{n / 2**30:8.2f}"


def _ensure_devices(n: int) -> bool:
    """True when this process can give `n` fake CPU devices (sets them up before JAX starts)."""
    from jax._src import xla_bridge

    if not xla_bridge.backends_are_initialized():
        flags = os.environ.get("XLA_FLAGS", "")
        flags = " ".join(f for f in flags.split() if not f.startswith("--xla_force_host_platform_device_count"))
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
        os.environ["JAX_PLATFORMS"] = "cpu"
        return True
    import jax

    return jax.default_backend() == "cpu" and jax.device_count() >= n


def _config(args):
    """The run's config, and its model's (a preset, or model.init's config.json: sizes checked)."""
    from sftrl_jax import config, planning

    data = config.apply_overrides(config.read_yaml(args.config), args.overrides)
    if "env" in data or "algo" in data:
        from sftrl_jax.rl.config import RLConfig as cls
    else:
        from sftrl_jax.sft.train import SFTConfig as cls
    cfg = config.from_dict(cls, data)
    planning.model_config_of(cfg.model)
    return cfg


def run(args) -> int:
    from sftrl_jax.errors import UserError

    if not 1 <= args.devices <= MAX_DEVICES:
        raise UserError(
            f"--devices must be in 1..{MAX_DEVICES} (fake devices of one process; plan a larger run with "
            f"fewer data-parallel replicas), got {args.devices}"
        )
    if args.images is not None and not 0 <= args.images <= 64:
        raise UserError(f"--images must be in 0..64 image slots per row, got {args.images}")
    if not (0 < args.limit_gib < float("inf")):
        raise UserError(f"--limit-gib must be a positive number, got {args.limit_gib}")
    if args.export_only and not args.platform:
        raise UserError("--export-only needs --platform cuda or --platform tpu")
    cfg = _config(args)  # refused here, before any device exists, if a setting or the model's size is bad
    if not _ensure_devices(args.devices):  # JAX already started with other devices: a fresh process
        argv = list(getattr(args, "argv", sys.argv[1:]))
        cmd = [sys.executable, "-m", "sftrl_jax.cli", *argv]
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={args.devices}", JAX_PLATFORMS="cpu")
        return subprocess.run(cmd, env=env, check=False).returncode

    import jax

    from sftrl_jax import planning
    from sftrl_jax.parallel import mesh as mesh_lib

    spec = args.mesh or cfg.train.mesh
    mesh = mesh_lib.make_mesh(mesh_lib.parse_mesh_spec(spec), devices=jax.devices()[: args.devices])
    policy = planning.programs.PLAN_POLICY_XLA if args.attention == "xla" else None
    programs = planning.programs_for(cfg, mesh, images=args.images, policy=policy)
    exports = {}
    if args.platform:  # the same programs traced with that platform's kernels (cuDNN, Pallas)
        from sftrl_jax import ops

        backend = "gpu" if args.platform == "cuda" else args.platform
        exports = {
            p.name: p for p in planning.programs_for(cfg, mesh, images=args.images, policy=ops.Policy(platform=backend))
        }
    if args.only:
        programs = [p for p in programs if args.only in p.name]
    if args.export_only:
        import time

        rows = []
        for p in programs:
            t0 = time.perf_counter()
            calls = planning.export_for(exports[p.name], args.platform)
            rows.append(
                {
                    "name": p.name,
                    "export_s": round(time.perf_counter() - t0, 1),
                    "export": {"platform": args.platform, "custom_calls": calls},
                }
            )
            if not args.json:
                print(f"{p.name:26} exported for {args.platform} in {rows[-1]['export_s']} s: custom calls [{calls}]")
        if args.json:
            print(json.dumps({"mesh": dict(mesh.shape), "devices": args.devices, "programs": rows}))
        return 0
    rows = []
    for p in programs:
        if not args.json:
            print(f"compiling {p.name} ...", file=sys.stderr, flush=True)
        row = planning.analyse(p, hoist=args.hoist)
        if args.platform:
            calls = planning.export_for(exports[p.name], args.platform)
            row["export"] = {"platform": args.platform, "custom_calls": calls}
        rows.append(row)
    if args.json:
        print(json.dumps({"mesh": dict(mesh.shape), "devices": args.devices, "programs": rows}))
        return 0
    print(f"{args.config}: mesh {dict(mesh.shape)} on {args.devices} fake CPU devices; per-device GiB")
    print(
        f"{'program':26} {'compile s':>9} {'args':>8} {'out':>8} {'temp':>8} {'peak':>8} {'TFLOPs':>8} {'ideal':>8} {'ratio':>6} {'coll GiB':>8}"
    )
    for r in rows:
        ideal = r["ideal_flops"] or 0.0
        ratio = r["flops"] / ideal if ideal else float("nan")
        print(
            f"{r['name']:26} {r['compile_s']:9.1f} {_gib(r['argument_bytes'])} {_gib(r['output_bytes'])} "
            f"{_gib(r['temp_bytes'])} {_gib(r['peak_bytes'])} {r['flops'] / 1e12:8.2f} {ideal / 1e12:8.2f} "
            f"{ratio:6.2f} {_gib(r['collective_bytes'])}"
        )
        if r.get("analytic_peak_bytes"):
            print(
                f"  analytic peak (GPU/TPU: reduce-scatter, see planning/memory.py): {_gib(r['analytic_peak_bytes']).strip()} GiB"
            )
        if "export" in r:
            print(f"  exported for {r['export']['platform']}: custom calls [{r['export']['custom_calls']}]")
    worst = max((r["peak_bytes"] for r in rows), default=0)
    fits = "fits" if worst <= args.limit_gib * 2**30 else "does NOT fit"
    print(
        f"largest per-device peak {worst / 2**30:.2f} GiB (XLA:CPU's buffers): {fits} in {args.limit_gib:g} GiB per device"
    )
    analytic = [r["analytic_peak_bytes"] or r["peak_bytes"] for r in rows]
    if any(r.get("analytic_peak_bytes") for r in rows):
        worst_a = max(analytic)
        fits_a = "fits" if worst_a <= args.limit_gib * 2**30 else "does NOT fit"
        print(
            f"largest analytic per-device peak {worst_a / 2**30:.2f} GiB: {fits_a} in {args.limit_gib:g} GiB per device"
        )
    return 0
