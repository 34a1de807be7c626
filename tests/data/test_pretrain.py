"""The study's pretraining corpus: what it contains, and what it must never contain."""

import collections
import json
import re

import pytest

from sftrl_jax import cli
from sftrl_jax.data import pretrain
from sftrl_jax.envs.general_points import cards, prompts, verifier

N = 3000


# J, Q, K valued 11, 12, 13 in any of the phrasings ("J=11, Q=12", "J->11", "J is worth 11", "'11', '12'")
_HELD_OUT = re.compile(r"J\W.{0,20}\b11\b.{0,30}Q\W.{0,20}\b12\b.{0,30}K\W.{0,20}\b13\b", re.S)


@pytest.fixture(scope="module", params=pretrain.WORDINGS)
def corpus(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("pretrain") / "pretrain.json"
    stats = pretrain.generate_pretrain(N, path, seed=0, wording=request.param)
    return stats, json.loads(path.read_text())


def test_corpus_never_states_the_rule_ood_rule_nor_uses_the_post_training_template(corpus):
    _, rows = corpus
    ood_sentence = prompts.face_card_message(False)  # "'J', 'Q', and 'K' count as '11', '12', and '13' respectively."
    template_lines = [
        line.split("{")[0].strip()
        for t in ("gp_l.txt", "gp_l_short.txt")
        for line in (prompts.TEMPLATE_DIR / t).read_text().splitlines()
        if len(line.split("{")[0].strip()) > 8
    ]
    assert template_lines  # e.g. "Use each card once to make", "[Task Description]"
    for r in rows:
        text = r["conversations"][0]["value"]
        assert ood_sentence not in text
        assert "J=11, Q=12, K=13" not in text and "J is worth 11, Q is worth 12 and K is worth 13" not in text
        assert not any(line in text for line in template_lines), text
        assert not _HELD_OUT.search(text), text
    # the pattern does find the held-out rule in every phrasing of both wordings
    import numpy as np

    rng = np.random.default_rng(5)
    assert pretrain.rule_sentence(pretrain.HELD_OUT_RULE, 0) == ood_sentence
    for style in (1, 2):
        assert _HELD_OUT.search(pretrain.rule_sentence(pretrain.HELD_OUT_RULE, style))
    for _ in range(50):
        text = pretrain.composed_prompt(rng, ["2", "J", "Q", "K"], pretrain.HELD_OUT_RULE, 24)
        assert _HELD_OUT.search(text) or ood_sentence in text, text


def test_composed_wording_states_cards_rule_and_target_in_varied_order():
    import numpy as np

    rng = np.random.default_rng(11)
    firsts, seps = collections.Counter(), collections.Counter()
    for _ in range(400):
        rule, target, symbols = (3, 7, 12), 37, ["A", "J", "Q", "K"]
        text = pretrain.composed_prompt(rng, symbols, rule, target)
        assert "37" in text and all(s in text for s in symbols), text
        stated = re.search(r"J\W.{0,20}\b3\b.{0,30}Q\W.{0,20}\b7\b.{0,30}K\W.{0,20}\b12\b", text, re.S)
        assert stated or pretrain.rule_sentence(rule, 0) in text, text
        firsts[text.split()[0]] += 1
        seps["\n" in text] += 1
    assert len(firsts) >= 10 and 150 < seps[True] < 250  # many openings; newline or space, half each
    with pytest.raises(Exception, match="unknown wording 'x'"):
        pretrain.generate_pretrain(3, "/tmp/never.json", wording="x")


def test_rule_and_target_mix_is_the_documented_one():
    import numpy as np

    rng = np.random.default_rng(0)
    rules = [pretrain.draw_rule(rng) for _ in range(20000)]
    assert pretrain.HELD_OUT_RULE not in rules
    equal = sum(j == q == k for j, q, k in rules) / len(rules)
    consecutive = sum(q == j + 1 and k == j + 2 for j, q, k in rules) / len(rules)
    assert abs(equal - (0.2 + 0.6 / 169)) < 0.015, equal  # all-equal draws + independent ones that are equal
    assert abs(consecutive - (0.2 * 10 / 11 + 0.6 / 13**2 * 10 / 13)) < 0.015, consecutive
    values = collections.Counter(v for r in rules for v in r)
    assert min(values) == 1 and max(values) == 13  # values above 10 are in the corpus
    exs = [pretrain.example(rng) for _ in range(1500)]
    share_24 = sum(e["target"] == 24 for e in exs) / len(exs)
    assert abs(share_24 - (1 / 3 + 2 / 3 / 60)) < 0.05, share_24
    assert len({e["target"] for e in exs}) > 40


def test_every_answer_is_correct_for_its_stated_rule(corpus):
    import numpy as np

    rng = np.random.default_rng(3)
    for _ in range(300):
        e = pretrain.example(rng)
        assert e["values"] == pretrain.values_of([cards.RANK_SYMBOLS.index(s) + 1 for s in e["symbols"]], e["rule"])
        puzzle = verifier.Puzzle(e["values"], e["symbols"], e["target"])
        assert verifier.score(e["answer"], puzzle).reward == 5.0, e
        assert str(e["target"]) in e["prompt"] and all(s in e["prompt"] for s in e["symbols"])
    stats, rows = corpus
    assert stats["examples"] == len(rows) == N and stats["distinct_rules"] > 500


def test_probe_deals_a_face_card_under_the_held_out_rule():
    held = pretrain.probe(50)
    assert all(e["rule"] == (11, 12, 13) and e["target"] == 24 for e in held)
    assert all(any(s in ("J", "Q", "K") for s in e["symbols"]) for e in held)
    assert all(v in (11, 12, 13) for e in held for s, v in zip(e["symbols"], e["values"]) if s in "JQK")
    ident = pretrain.probe(50, rule=(10, 10, 10))
    assert all(max(e["values"]) <= 10 for e in ident)
    assert pretrain.probe(5)[0]["prompt"] == held[0]["prompt"]  # seeded


def test_cli_writes_the_corpus(tmp_path, capsys):
    out = tmp_path / "c.json"
    assert cli.main(["data", "pretrain", "--n", "20", "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["examples"] == 20
    assert len(json.loads(out.read_text())) == 20
    assert cli.main(["data", "pretrain", "--n", "0", "--out", str(out)]) == 2
    assert cli.main(["data", "pretrain", "--n", "5", "--wording", "composed", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["id"] for r in rows] == [f"composed-{i:07d}" for i in range(5)]
    assert rows[0]["conversations"][0]["value"] not in {p.split("{")[0] for p in pretrain.PROMPTS}
