"""`sftrl data`: SFT data (the reference conversation JSON) generated from the environments."""

from __future__ import annotations

import json

from sftrl_jax.errors import UserError

HELP = "generate SFT data (conversation JSON) from the environments"
EXAMPLES = """examples:
  sftrl data gp --variant gp-l --split train --n 2000 --out data/gp_l_train.json
  sftrl data gp --variant gp-l --split train --n 4000 --dealt-order \
      --template sftrl_jax/envs/general_points/templates/gp_l_short.txt --out data/gp_l_train.json  # tiny models
  sftrl data gp --variant gp-vl --split train --n 500 --out data/gp_vl/train.json   # images beside it
  sftrl data virl --variant virl-l --split train --n 1000 --out data/virl_l_train.json
  sftrl data pretrain --n 96000 --out data/study/pretrain.json   # the study's pretraining corpus
  sftrl data pretrain --n 30000 --wording composed --out data/study/pretrain_composed.json  # its 2nd stage

The file is one JSON array of {"image"?, "conversations": [{"from": "human"|"gpt", "value"}]}
examples, the format of the paper's released SFT data; `sftrl sft` reads it.
"""

_VARIANTS = {"gp": ("gp-l", "gp-vl"), "virl": ("virl-l", "virl-vl")}


def add_arguments(parser):
    sub = parser.add_subparsers(dest="task", metavar="<task>", required=True)
    for task, variants in _VARIANTS.items():
        p = sub.add_parser(task, help=f"{'GeneralPoints' if task == 'gp' else 'V-IRL'} expert answers")
        p.add_argument("--variant", choices=variants, default=variants[0], help="text (-l) or image (-vl) task")
        p.add_argument("--split", choices=("train", "id", "ood-rule", "ood-visual"), default="train")
        p.add_argument("--n", type=int, required=True, help="number of examples")
        p.add_argument("--out", required=True, help="output JSON file (images go to <dir>/images/)")
        p.add_argument("--seed", type=int, default=0)
        if task == "gp":
            p.add_argument(
                "--dealt-order",
                action="store_true",
                help="prefer formulas that use the numbers in dealt order (easier for small models)",
            )
            p.add_argument("--template", default=None, help="prompt template file (default: ours)")
            p.add_argument(
                "--revisions",
                type=float,
                default=0.0,
                help="fraction of revision examples: failed tries, each with the verifier's feedback, then the answer",
            )
            p.add_argument(
                "--max-failed",
                type=int,
                default=1,
                help="failed tries per revision example: 1..N, uniformly (N < the env's verify_iter)",
            )
    p = sub.add_parser(
        "pretrain",
        help="the study's pretraining corpus: card arithmetic under many stated rules and targets "
        "(sftrl_jax/data/pretrain.py; never the rule-OOD rule)",
    )
    p.add_argument("--n", type=int, required=True, help="number of examples")
    p.add_argument("--out", required=True, help="output JSON file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--wording",
        choices=("own", "composed"),
        default="own",
        help="own: three fixed phrasings (the base's first stage); composed: sentences in random order "
        "and phrasing (its second stage, configs/study/pretrain_composed.yaml)",
    )


def run(args) -> int:
    if args.n <= 0:
        raise UserError(f"--n must be positive, got {args.n}")
    if args.task == "pretrain":
        from sftrl_jax.data.pretrain import generate_pretrain

        print(
            json.dumps({"out": args.out, **generate_pretrain(args.n, args.out, seed=args.seed, wording=args.wording)})
        )
        return 0
    if args.task == "gp":
        from sftrl_jax.data.generate import generate_gp_sft as generate

        extra = {
            "dealt_order": args.dealt_order,
            "revisions": args.revisions,
            "max_failed": args.max_failed,
            "env_options": {"template": args.template} if args.template else None,
        }
    else:
        from sftrl_jax.envs.virl.expert import generate_virl_sft as generate

        extra = {}
    stats = generate(args.variant, args.split, args.n, args.out, seed=args.seed, **extra)
    print(json.dumps({"out": args.out, **stats}, default=str))
    return 0
