"""Ships a pretrained study base into the package: safetensors + config, sha256, provenance, probe.

    python tools/ship_base.py --ckpt runs/study/pretrain_composed/final \
        --data "sftrl data pretrain --n 96000 --out data/study/pretrain.json" \
        --data "sftrl data pretrain --n 30000 --wording composed --out data/study/pretrain_composed.json" \
        --command "sftrl sft --config configs/study/pretrain.yaml" --stage runs/study/pretrain \
        --command "sftrl sft --config configs/study/pretrain_composed.yaml" --stage runs/study/pretrain_composed

Writes `sftrl_jax/data/assets/gp_l_base/`: `config.json` + `model.safetensors` (fp32, the Hugging Face
layout `sftrl_jax.models.save_pretrained` writes), `base.json` (sha256 of each file, the commit and
the commands that made it (corpus, then each training stage with its steps, loss and time from the
stage's metrics.jsonl), the parameter count, the probe numbers of `sftrl_jax.study.probe_base` on
the shipped files, recorded so that tests/test_shipped_base.py can check they reproduce) and
`BASE.md` (the same, for a reader).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess

from sftrl_jax import integrity, study

FILES = ("config.json", "model.safetensors")


def _stage(command: str, run_dir: str) -> dict:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    train = [r for r in rows if "train/loss" in r]
    last = train[-1]
    return {
        "command": command,
        "run_dir": run_dir,
        "steps": int(last["step"]),
        "final_loss": round(float(last["train/loss"]), 4),
        "final_token_accuracy": round(float(last["train/token_accuracy"]), 4),
        "wall_minutes": round(
            (float(last["time"]) - float(train[0]["time"])) / 60 * len(train) / max(1, len(train) - 1), 1
        )
        if len(train) > 1
        else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="the pretraining run's final model folder")
    p.add_argument("--data", action="append", default=[], help="a corpus command (recorded; repeat per corpus)")
    p.add_argument("--command", action="append", required=True, help="a training stage's command (recorded; repeat)")
    p.add_argument("--stage", action="append", default=[], help="each stage's run folder (its metrics are recorded)")
    p.add_argument("--out", default=study.SHIPPED_BASE)
    p.add_argument("--probe-episodes", type=int, default=234)
    args = p.parse_args()
    if args.stage and len(args.stage) != len(args.command):
        p.error(f"--stage given {len(args.stage)} times but --command {len(args.command)} times")

    from sftrl_jax import models
    from sftrl_jax.models import checkpoint, param_count

    model = checkpoint.load_checkpoint(args.ckpt)
    if os.path.isdir(args.out):
        shutil.rmtree(args.out)
    models.save_pretrained(model, args.out, dtype="float32")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    cfg = study.StudyConfig(base=args.out, probe_episodes=args.probe_episodes, progress=False)
    probe = study.probe_base(cfg, args.out)
    record = {
        "sha256": {f: integrity.sha256_of(os.path.join(args.out, f)) for f in FILES},
        "bytes": {f: os.path.getsize(os.path.join(args.out, f)) for f in FILES},
        "parameters": int(param_count(model.config)),
        "commit": commit,
        "data": args.data,
        "command": " && ".join(args.command),
        "pretraining": [_stage(c, d) for c, d in zip(args.command, args.stage)],
        "probe_episodes": args.probe_episodes,
        "probe": probe,
    }
    with open(os.path.join(args.out, "base.json"), "w") as f:
        json.dump(record, f, indent=2)
    lines = [
        "# The study's pretrained base (GP-L, small scale)",
        "",
        f"A {record['parameters']:,}-parameter Llama pretrained on `sftrl_jax/data/pretrain.py`'s corpus "
        "(docs/RESULTS.md, 'Small-scale study'). Shipped at commit "
        f"`{commit}`; made by:",
        "",
        *[f"    {c}" for c in args.data],
        *[f"    {c}" for c in args.command],
        "",
        *[
            f"- stage {i + 1}: {st['steps']:,} steps, final loss {st['final_loss']}, token accuracy "
            f"{100 * st['final_token_accuracy']:.1f}% on the answer tokens, ~{st['wall_minutes']} min on 2 CPU cores"
            for i, st in enumerate(record["pretraining"])
        ],
        "",
        "| file | bytes | sha256 |",
        "|---|---|---|",
        *[f"| {f} | {record['bytes'][f]:,} | `{record['sha256'][f]}` |" for f in FILES],
        "",
        f"Probe (greedy, one turn, {args.probe_episodes} prompts per rule, the pretraining wording, target 24):",
        "",
        *[
            f"- {name} (J/Q/K = {'/'.join(map(str, r['rule']))}): {100 * r['success']:.1f}% ± {100 * r['stderr']:.1f}"
            for name, r in probe.items()
        ],
        "",
    ]
    with open(os.path.join(args.out, "BASE.md"), "w") as f:
        f.write("\n".join(lines))
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
