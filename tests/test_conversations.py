"""The reference conversation format <-> chat messages."""

import pytest

from sftrl_jax.data import conversations
from sftrl_jax.errors import UserError


def test_image_marker_becomes_first_content_item_and_back():
    ex = {
        "image": "images/0.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat cards?"},
            {"from": "gpt", "value": "A, 2"},
            {"from": "human", "value": "You failed this trial because x."},
        ],
    }
    msgs = conversations.to_messages(ex)
    assert msgs == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What cards?"}]},
        {"role": "assistant", "content": "A, 2"},
        {"role": "user", "content": "You failed this trial because x."},
    ]


@pytest.mark.parametrize(
    "ex, match",
    [
        ({}, "'conversations' must be a non-empty list"),
        ({"conversations": [{"from": "robot", "value": "x"}]}, "unknown speaker 'robot'"),
        ({"conversations": [{"value": "x"}]}, r"conversations\[0\] needs 'from' and 'value'"),
        ({"conversations": [{"from": "human", "value": "<image>\nx"}]}, "has no 'image'"),
        ({"conversations": [{"from": "gpt", "value": "x", "loss": "no"}]}, r"\['loss'\] must be true or false"),
        ({"conversations": [{"from": "human", "value": "x", "loss": False}]}, "only assistant turns are training"),
    ],
)
def test_bad_examples_are_named(ex, match):
    with pytest.raises(UserError, match=match):
        conversations.to_messages(ex, where="data.json[3]")


def test_loss_false_turn_is_kept_as_context():
    ex = {
        "conversations": [
            {"from": "human", "value": "Cards?"},
            {"from": "gpt", "value": "1+2=24", "loss": False},
            {"from": "human", "value": "You failed this trial because x."},
            {"from": "gpt", "value": "4*6=24"},
        ]
    }
    msgs = conversations.to_messages(ex)
    assert msgs[1] == {"role": "assistant", "content": "1+2=24", "loss": False}
    assert "loss" not in msgs[3]
