"""Validation probes of the small-scale study (docs/RESULTS.md, "Fixes tried"): never the evaluation hands.

python tools/study_probe.py base sftrl_jax/data/assets/gp_l_base
    # the base's first answers on its own wording: share writing each rule's values (128 prompts)
python tools/study_probe.py warmup NAME STEPS LR DATA
    # an SFT warm-up variant from the shipped base -> /tmp/fix/NAME, then its first answers to 128 ID
    # and 128 rule-OOD hands dealt from seed 99 (the evaluation uses 42): numbers right, success
"""

import json
import os
import sys

from sftrl_jax import envs, sampling, study
from sftrl_jax.data import pretrain
from sftrl_jax.envs.general_points import answer as A
from sftrl_jax.envs.general_points import prompts, verifier
from sftrl_jax.train.state import load_for_eval


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


_CARDS = ("Cards: {c}.", "Hand: {c}.", "The cards are {c}.", "You hold {c}.", "Dealt: {c}.", "{c} are your cards.")
_RULES = (
    "J={j}, Q={q}, K={k}.",
    "J is worth {j}, Q is worth {q} and K is worth {k}.",
    "Face cards: J counts {j}, Q counts {q}, K counts {k}.",
    "Values: J->{j}, Q->{q}, K->{k}.",
    "Here J means {j}, Q means {q}, K means {k}.",
)
_TARGETS = (
    "Make {t}.",
    "Reach {t} using each card once.",
    "Goal: {t}, every card exactly once, with + - * / and brackets.",
    "Write a formula equal to {t}.",
    "Target {t}.",
)


def composed_prompt(rng, symbols, rule, target):
    j, q, k = rule
    fmt = int(rng.integers(4))
    c = (", ".join(symbols), " ".join(symbols), "[" + ", ".join(symbols) + "]", repr(list(symbols)))[fmt]
    if int(rng.integers(3)) == 0:
        r = pretrain.rule_sentence(rule, 0)  # the rule language of the task, other values
    else:
        r = _RULES[int(rng.integers(len(_RULES)))].format(j=j, q=q, k=k)
    parts = [
        _CARDS[int(rng.integers(len(_CARDS)))].format(c=c),
        r,
        _TARGETS[int(rng.integers(len(_TARGETS)))].format(t=target),
    ]
    order = rng.permutation(3)
    return ("\n" if rng.random() < 0.5 else " ").join(parts[i] for i in order)


def corpus(n, out):
    import numpy as np

    rng = np.random.default_rng([0, 9])
    rows = []
    for i in range(n):
        e = pretrain.example(rng)
        p = composed_prompt(rng, e["symbols"], e["rule"], e["target"])
        rows.append(
            {
                "id": f"pt2-{i:07d}",
                "conversations": [{"from": "human", "value": p}, {"from": "gpt", "value": e["answer"]}],
            }
        )
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(rows, f)
    print(json.dumps({"examples": n, "out": out, "sample": rows[0]["conversations"][0]["value"]}))


def warmup(name, steps, lr, data, base_dir=study.SHIPPED_BASE):
    from sftrl_jax.sft.train import train as sft_train

    cfg = study.StudyConfig(progress=False)
    run = f"/tmp/fix/{name}"
    if not os.path.isdir(run + "/final"):
        sft_train(study._sft_cfg(cfg, run_dir=run, data=data, steps=steps, lr=lr, init=base_dir, seed=0, d_init=0))
    model, tok, _ = load_for_eval(run + "/final", "gp-l")
    out = {"name": name, "steps": steps, "lr": lr}
    for split in ("id", "ood-rule"):
        env = envs.make("gp-l", split=split, template=str(prompts.SHORT_TEMPLATE))
        hands, texts = [], []
        for i in range(128):
            o, info = env.reset(seed=99 * 1_000_003 + i)
            hands.append(info)
            texts.append(o["text"])
        outs = _answers(model, tok, texts)
        rule = sum(_numbers(t) == sorted(h["numbers"]) for t, h in zip(outs, hands))
        win = sum(
            verifier.score(t, verifier.Puzzle(h["numbers"], h["cards"], 24)).reward == 5 for t, h in zip(outs, hands)
        )
        out[split] = {"numbers_right": rule / 128, "first_turn_success": win / 128}
    print(json.dumps(out))


if __name__ == "__main__":
    if sys.argv[1] == "base":
        base(sys.argv[2])
    elif sys.argv[1] == "corpus":
        corpus(int(sys.argv[2]), sys.argv[3])
    else:
        warmup(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5], *sys.argv[6:7])
