"""Validation probes of the small-scale study (docs/RESULTS.md, "Fixes tried"): never the evaluation hands.

python tools/study_probe.py base sftrl_jax/data/assets/gp_l_base
    # the base's first answers on its own wording: share writing each rule's values (128 prompts)
python tools/study_probe.py warmup NAME STEPS LR DATA
    # an SFT warm-up variant from the shipped base -> /tmp/fix/NAME, then its first answers to 234 ID
    # and 234 rule-OOD hands dealt from seed 99 (the evaluation uses 42): numbers right, success
python tools/study_probe.py validate NAME STEPS LR DATA [BASE]
    # the same warm-up, then the evaluation's protocol (234 hands, 5 tries with feedback, greedy) on
    # validation hands dealt from seed 99 instead of 42, ID and rule-OOD: how the study's warm-up is chosen
"""

import json
import os
import sys

from sftrl_jax import envs, sampling, study
from sftrl_jax.data import pretrain
from sftrl_jax.envs.general_points import answer as A
from sftrl_jax.envs.general_points import prompts, verifier
from sftrl_jax.train.state import load_for_eval

N_VALID = 234  # validation hands per split (dealt from seed 99; the evaluation deals from 42)


def _numbers(text):
    try:
        return sorted(int(x) for x in A.parse_answer(text).numbers)
    except ValueError:
        return None


def _answers(model, tok, texts):
    ids = [tok.chat_ids([{"role": "user", "content": t}], add_generation_prompt=True) for t in texts]
    res = sampling.generate(model, ids, max_new_tokens=64, temperature=0.0, stop_tokens=tok.stop_ids, pad_id=tok.pad_id)
    return [tok.decode(list(res.tokens[j, : int(res.lengths[j])])) for j in range(len(texts))]


def base(ckpt):
    model, tok, _ = load_for_eval(ckpt, "gp-l")
    for name, rule in (("held_out", (11, 12, 13)), ("id", (10, 10, 10)), ("unseen J=12,Q=13,K=11", (12, 13, 11))):
        pr = pretrain.probe(128, rule=rule)
        outs = _answers(model, tok, [p["prompt"] for p in pr])
        right = sum(_numbers(o) == sorted(p["values"]) for o, p in zip(outs, pr))
        print(json.dumps({"rule": name, "numbers_right": right / len(pr), "n": len(pr)}))


def _warmed(cfg, name, steps, lr, data, base_dir):
    """The study's SFT warm-up variant from `base_dir` -> /tmp/fix/NAME (kept: a second call loads it)."""
    from sftrl_jax.sft.train import train as sft_train

    run = f"/tmp/fix/{name}"
    if not os.path.isdir(run + "/final"):
        sft_train(study._sft_cfg(cfg, run_dir=run, data=data, steps=steps, lr=lr, init=base_dir, seed=0, d_init=0))
    return load_for_eval(run + "/final", "gp-l")


def warmup(name, steps, lr, data, base_dir=study.SHIPPED_BASE):
    model, tok, _ = _warmed(study.StudyConfig(progress=False), name, steps, lr, data, base_dir)
    out = {"name": name, "steps": steps, "lr": lr}
    for split in ("id", "ood-rule"):
        env = envs.make("gp-l", split=split, template=str(prompts.SHORT_TEMPLATE))
        hands, texts = [], []
        for i in range(N_VALID):
            o, info = env.reset(seed=99 * 1_000_003 + i)
            hands.append(info)
            texts.append(o["text"])
        outs = _answers(model, tok, texts)
        rule = sum(_numbers(t) == sorted(h["numbers"]) for t, h in zip(outs, hands))
        win = sum(
            verifier.score(t, verifier.Puzzle(h["numbers"], h["cards"], 24)).reward == 5 for t, h in zip(outs, hands)
        )
        out[split] = {"numbers_right": rule / N_VALID, "first_turn_success": win / N_VALID, "n": N_VALID}
    print(json.dumps(out))


def validate(name, steps, lr, data, base_dir=study.SHIPPED_BASE):
    import dataclasses

    from sftrl_jax.evaluation import evaluate as ev
    from sftrl_jax.sampling.policy import SamplingSection, make_policy

    cfg = study.StudyConfig(progress=False)
    model, tok, proc = _warmed(cfg, name, steps, lr, data, base_dir)
    out = {"name": name, "steps": steps, "lr": lr, "base": base_dir}
    for split in ("id", "ood-rule"):
        policy = make_policy(
            model, tok, SamplingSection(max_new_tokens=64), seed=0, image_processor=proc, temperature=0.0
        )
        proto = dataclasses.replace(ev.protocol("gp-l", split), seed=99)
        s = ev.evaluate(policy, tok, proto, batch_size=cfg.eval_batch, progress=False, env_options=cfg.env_options())
        out[split] = {k: s[k] for k in ("success_rate", "success_rate_stderr", "episodes")}
    print(json.dumps(out))


if __name__ == "__main__":
    if sys.argv[1] == "base":
        base(sys.argv[2])
    elif sys.argv[1] == "validate":
        validate(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5], *sys.argv[6:7])
    else:
        warmup(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5], *sys.argv[6:7])
