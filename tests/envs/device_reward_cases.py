"""Answer mixes and a host-vs-device harness for the device-reward differential tests (tests only).

Every case is (token ids, env state before the step, host reward, host outcome), the host side taken
from a real `env.step(tokenizer.decode(ids))`. `compare` runs the device reward over all cases in a
few jitted calls of fixed shapes and sorts the disagreements into documented exceptions and
mismatches."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np

from sftrl_jax import envs
from sftrl_jax.envs import device_text

UNICODE_DIGITS = ("\u0663", "\u06f4", "\u0968", "\uff18", "\U0001d7d0", "\u09e7", "\u0e52", "\u1040")


@dataclasses.dataclass
class Cases:
    ids: list[list[int]] = dataclasses.field(default_factory=list)
    states: list[dict] = dataclasses.field(default_factory=list)
    rewards: list[float] = dataclasses.field(default_factory=list)
    outcomes: list[str] = dataclasses.field(default_factory=list)
    texts: list[str] = dataclasses.field(default_factory=list)

    def add(self, ids, state, reward, outcome, text):
        self.ids.append(list(ids))
        self.states.append(state)
        self.rewards.append(float(reward))
        self.outcomes.append(str(outcome))
        self.texts.append(text)

    def __len__(self):
        return len(self.ids)


def encode_all(tokenizer, texts: list[str]) -> list[list[int]]:
    return [list(x) for x in tokenizer.hf(texts, add_special_tokens=False)["input_ids"]]


def play(env, tokenizer, answers_for, n_episodes: int, rng, *, outcome_key: str, stop_ids=()) -> Cases:
    """Episodes of `env` answered by `answers_for(env, rng) -> text or token ids`, every turn recorded."""
    cases = Cases()
    for _ in range(n_episodes):
        env.reset(seed=int(rng.integers(1 << 30)))
        for _ in range(8):
            state = env.device_state()
            answer = answers_for(env, rng)
            if isinstance(answer, str):
                ids = tokenizer.encode(answer)
            else:
                ids = [int(t) for t in answer]
            text = tokenizer.decode([t for t in ids if t not in stop_ids])
            _, reward, terminated, truncated, info = env.step(text)
            cases.add(ids, state, reward, info[outcome_key], text)
            if terminated or truncated:
                break
    return cases


@dataclasses.dataclass
class Report:
    total: int
    mismatches: list[tuple[int, str, float, str, float, str]]  # (index, text, host r, host o, dev r, dev o)
    exceptions: dict[str, int]

    @property
    def exception_count(self) -> int:
        return sum(self.exceptions.values())


def run_device(fn, cases: Cases, *, length: int, batch: int, pad_id: int, call=None):
    """Device rewards and outcome names of all cases, `batch` rows of `length` ids per call
    (`call`: the jitted `fn.with_outcome`, to reuse a compiled one)."""
    call = call or jax.jit(fn.with_outcome)
    n = len(cases)
    rewards, outcomes = np.zeros(n, np.float32), np.zeros(n, np.int32)
    for lo in range(0, n, batch):
        idx = list(range(lo, min(lo + batch, n)))
        rows = idx + [idx[-1]] * (batch - len(idx))
        arr = np.full((batch, length), pad_id, np.int32)
        lens = np.zeros(batch, np.int32)
        for r, i in enumerate(rows):
            ids = cases.ids[i][:length]
            arr[r, : len(ids)] = ids
            lens[r] = len(ids)
        state = envs.stack_states([cases.states[i] for i in rows])
        rw, oc = call(arr, lens, state)
        rewards[idx], outcomes[idx] = np.asarray(rw)[: len(idx)], np.asarray(oc)[: len(idx)]
    return rewards, [fn.outcomes[o] for o in outcomes]


def compare(fn, tokenizer, cases: Cases, *, length: int, batch: int) -> Report:
    table = device_text.byte_table(tokenizer)
    rewards, outcomes = run_device(fn, cases, length=length, batch=batch, pad_id=tokenizer.pad_id)
    mismatches, exceptions = [], {"tokenizer decoding": 0, "did not fit": 0, "json too deep": 0}
    for i in range(len(cases)):
        if rewards[i] == np.float32(cases.rewards[i]) and outcomes[i] == cases.outcomes[i]:
            continue
        raw = b"".join(bytes(table.table[t][: table.lengths[t]].tolist()) for t in cases.ids[i])
        if outcomes[i] == device_text.DID_NOT_FIT or len(cases.ids[i]) > length:
            exceptions["did not fit"] += 1
        elif outcomes[i] == device_text.JSON_TOO_DEEP:  # left to the host, which decides it
            exceptions["json too deep"] += 1
        elif raw.decode("utf-8", "replace") != cases.texts[i]:
            exceptions["tokenizer decoding"] += 1
        else:
            mismatches.append((i, cases.texts[i], cases.rewards[i], cases.outcomes[i], rewards[i], outcomes[i]))
    return Report(len(cases), mismatches, exceptions)


def max_nesting(text: str) -> int:
    """The deepest run of '[' / '{' not yet closed, strings not skipped (at least the JSON depth)."""
    depth = best = 0
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        best = max(best, depth)
    return best


def jsonish(rng, keys=("formula", "cards", "number")) -> str:
    """A random JSON-like object: real and near-real keys, values of every type, escapes, nesting."""
    parts = []
    for _ in range(int(rng.integers(0, 5))):
        key = rng.choice([*keys, "formul\\u0061", "x", "cards ", "FORMULA"])
        kind = rng.integers(8)
        if kind == 0:
            val = json.dumps(str(rng.choice(["6*4*1*1=24", "(6+4", "\\u0036*4", "1+2=3=4", "a\\nb"])))
            val = val.replace("\\\\u", "\\u").replace("\\\\n", "\\n")
        elif kind == 1:
            val = str(rng.choice(["1", "-0", "1.5e3", "01", "true", "null", "NaN", "-Infinity", "1e", "2."]))
        elif kind == 2:
            items = [json.dumps(str(rng.choice(["A", "2", "10", "K", " 1 0", "J"]))) for _ in range(rng.integers(3, 6))]
            val = "[" + ", ".join(items) + "]"
        elif kind == 3:
            val = "[" + ", ".join(str(rng.integers(0, 12)) for _ in range(4)) + "]"
        elif kind == 4:
            val = "{" + f'"formula": "{rng.integers(100)}"' + "}"
        elif kind == 5:
            val = '"' + "".join(rng.choice(list('0123456789+-*/()= \\"u'), size=rng.integers(0, 12))) + '"'
        elif kind == 6:
            val = "[[" + "]" * int(rng.integers(0, 3))
        else:
            val = '"A, 3, K, 10"'
        parts.append(f'"{key}": {val}')
    sep = str(rng.choice([", ", ",", ",\n  ", " , "]))
    body = "{" + sep.join(parts) + str(rng.choice(["}", ",}", "}\n", "", "} x", "}}"]))
    return str(rng.choice(["", " ", "\n", "x"])) + body
