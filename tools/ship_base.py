"""Ships a pretrained study base into the package: safetensors + config, sha256, provenance, probe.

    python tools/ship_base.py --ckpt runs/study/pretrain/final --command "sftrl sft --config configs/study/pretrain.yaml"

Writes `sftrl_jax/data/assets/gp_l_base/`: `config.json` + `model.safetensors` (fp32, the Hugging Face
layout `sftrl_jax.models.save_pretrained` writes), `base.json` (sha256 of each file, the commit and
the command that made it, the parameter count, the probe numbers of `sftrl_jax.study.probe_base` on
the shipped files, recorded so that tests/test_shipped_base.py can check they reproduce) and
`BASE.md` (the same, for a reader).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess

from sftrl_jax import study

FILES = ("config.json", "model.safetensors")


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="the pretraining run's final model folder")
    p.add_argument("--command", required=True, help="the command that made it (recorded)")
    p.add_argument("--out", default=study.SHIPPED_BASE)
    p.add_argument("--probe-episodes", type=int, default=234)
    args = p.parse_args()

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
        "sha256": {f: sha256(os.path.join(args.out, f)) for f in FILES},
        "bytes": {f: os.path.getsize(os.path.join(args.out, f)) for f in FILES},
        "parameters": int(param_count(model.config)),
        "commit": commit,
        "command": args.command,
        "probe_episodes": args.probe_episodes,
        "probe": probe,
    }
    with open(os.path.join(args.out, "base.json"), "w") as f:
        json.dump(record, f, indent=2)
    lines = [
        "# The study's pretrained base (GP-L, small scale)",
        "",
        f"A {record['parameters']:,}-parameter Llama pretrained on `sftrl_jax/data/pretrain.py`'s corpus "
        "(docs/RESULTS.md, 'Small-scale study'). Made at commit "
        f"`{commit}` by:",
        "",
        f"    sftrl data pretrain --n 96000 --out data/study/pretrain.json && {args.command}",
        f"    python tools/ship_base.py --ckpt {args.ckpt} --command '{args.command}'",
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
