"""The multi-turn episode runner: conversation updates, resets, batching, episode quotas."""

import pytest

from sftrl_jax import episodes as rollout
from sftrl_jax.data.tokenizer import load_tokenizer


class Countdown:
    """Answer 'ok' to win (+5); anything else gets feedback; 2 graded tries, then truncation (-1)."""

    def __init__(self, new_conversation=False):
        self.new_conversation = new_conversation

    def reset(self, seed=None, options=None):
        self.left, self.seed = 2, seed
        return {"text": f"episode {seed}: say ok", "image": None}, {}

    def step(self, text):
        if self.left == 0:
            return {"text": "", "image": None}, -1.0, False, True, {"verify_message": "step_limit_reached"}
        self.left -= 1
        if text == "ok":
            return {"text": "", "image": None}, 5.0, True, False, {"verify_message": "Correct solution"}
        info = {"verify_message": "wrong", "new_conversation": self.new_conversation}
        text = "You failed this trial because wrong."
        if self.new_conversation:  # a fresh full prompt, as V-IRL gives after a correct action
            text = f"episode {self.seed}: say ok. {text}"
        return {"text": text, "image": None}, -1.0, False, False, info


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def scripted(tok, answers):
    """Answers by (call count per context's first user message)."""
    calls = []

    def policy(contexts, images):
        calls.append([tok.decode(c, skip_special_tokens=False) for c in contexts])
        out = []
        for c in calls[-1]:
            ep = int(c.split("episode ")[1].split(":")[0])
            ans = answers(ep, c.count("You failed this trial"))
            out.append((tok.encode(ans) + [tok.eot_id], [-0.5] * (len(tok.encode(ans)) + 1)))
        return out

    return policy, calls


def test_feedback_is_appended_and_episodes_reset(tok):
    # Episode e succeeds after e failures; e >= 2 is truncated after 2 graded failures.
    policy, calls = scripted(tok, lambda ep, fails: "ok" if fails >= ep else "no")
    runner = rollout.EpisodeRunner([Countdown(), Countdown()], tok, policy)
    buffer = rollout.collect(runner, 4)
    rewards, dones = rollout.rewards_array(buffer)
    # env0: ep0 ok | ep2 no,no,trunc ; env1: ep1 no,ok | ep3 no
    assert rewards.tolist() == [[5.0, -1.0], [-1.0, 5.0], [-1.0, -1.0], [-1.0, -1.0]]
    assert dones.tolist() == [[1, 0], [0, 1], [0, 0], [1, 0]]
    success, dones2 = rollout.rewards_array(buffer, "success")  # ppo.reward_mode="success"
    assert success.tolist() == [[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]] and (dones2 == dones).all()
    with pytest.raises(ValueError, match="'env' or 'success'"):
        rollout.rewards_array(buffer, "sum")
    assert buffer[2][0].truncated is False and buffer[3][0].truncated is True
    ctx = tok.decode(buffer[1][1].context_ids, skip_special_tokens=False)
    assert ctx.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert "<|start_header_id|>assistant<|end_header_id|>\n\nno<|eot_id|>" in ctx
    assert "You failed this trial because wrong.<|eot_id|>" in ctx
    assert buffer[0][0].text == "ok" and buffer[0][0].logprobs == [-0.5] * len(buffer[0][0].response_ids)
    assert [t.turn for t in (buffer[0][1], buffer[1][1])] == [0, 1]
    assert len(calls) == 4 and all(len(c) == 2 for c in calls)  # one batched call per step


def test_new_conversation_replaces_the_chat(tok):
    policy, _ = scripted(tok, lambda ep, fails: "no")
    runner = rollout.EpisodeRunner([Countdown(new_conversation=True)], tok, policy)
    buffer = rollout.collect(runner, 2)
    ctx = tok.decode(buffer[1][0].context_ids, skip_special_tokens=False)
    assert "You failed this trial because wrong." in ctx and "no<|eot_id|>" not in ctx


def test_run_episodes_runs_exactly_the_quota(tok):
    policy, calls = scripted(tok, lambda ep, fails: "ok" if ep % 2 == 0 else "no")
    runner = rollout.EpisodeRunner([Countdown() for _ in range(4)], tok, policy, reset_fn=lambda i, ep: (ep, None))
    turns = rollout.run_episodes(runner, 7)
    table = rollout.episode_table(turns)
    assert sorted(table) == list(range(7))
    for ep, ts in table.items():
        assert [t.reward for t in ts] == ([5.0] if ep % 2 == 0 else [-1.0, -1.0, -1.0])
    assert sum(1 for ts in table.values() if ts[-1].terminated) == 4


def test_state_round_trip_replays_episodes_in_progress(tok):
    import json

    answers = lambda ep, fails: "ok" if fails >= ep % 3 else "no"  # noqa: E731
    policy, _ = scripted(tok, answers)
    runner = rollout.EpisodeRunner([Countdown(), Countdown()], tok, policy)
    rollout.collect(runner, 2)
    state = json.loads(json.dumps(runner.state()))  # what the checkpoint's JSON holds
    assert any(row["texts"] for row in state["envs"])  # an episode is mid-way: its answers are saved
    resumed = rollout.EpisodeRunner([Countdown(), Countdown()], tok, scripted(tok, answers)[0])
    resumed.load_state(state)
    a, b = rollout.collect(runner, 3), rollout.collect(resumed, 3)
    key = lambda t: (t.env_index, t.episode, t.turn, t.context_ids, t.response_ids, t.reward, t.done)  # noqa: E731
    assert [[key(t) for t in row] for row in a] == [[key(t) for t in row] for row in b]
    # An env that replays differently (not deterministic given its seed) is refused, not silently resumed.
    state["envs"][[bool(r["texts"]) for r in state["envs"]].index(True)]["rewards"][0] = 99.0
    with pytest.raises(rollout.UserError, match="replayed episode .* differently"):
        rollout.EpisodeRunner([Countdown(), Countdown()], tok, policy).load_state(state)
