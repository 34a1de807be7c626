"""SFT data pipeline: masks on assistant tokens only, bucket padding, truncation, images, resume."""

import json

import numpy as np
import pytest
from PIL import Image

from sftrl_jax.data import processor, sft
from sftrl_jax.data.tokenizer import load_tokenizer
from sftrl_jax.errors import UserError


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def _write(tmp_path, examples, name="d.json"):
    p = tmp_path / name
    p.write_text(json.dumps(examples))
    return str(p)


def _examples(n):
    return [
        {
            "id": i,
            "conversations": [{"from": "human", "value": f"Add {i} and 1."}, {"from": "gpt", "value": f"{i + 1}"}],
        }
        for i in range(n)
    ]


def test_batches_mask_only_assistant_tokens(tmp_path, tok):
    cfg = sft.SFTDataConfig(
        train_files=(_write(tmp_path, _examples(6)),), batch_size=2, buckets=(16, 32, 64), max_length=64, shuffle=False
    )
    batch = next(sft.SFTData(cfg, tok).iterator())
    assert batch["input_ids"].shape == (2, 32)  # ~25 tokens -> bucket 32
    for b in range(2):
        n = int(batch["attention_mask"][b].sum())
        ids = batch["input_ids"][b, :n].tolist()
        assert ids[0] == tok.bos_id and ids[-1] == tok.eot_id
        np.testing.assert_array_equal(batch["targets"][b, : n - 1], ids[1:])
        learned = batch["targets"][b][batch["loss_mask"][b] == 1].tolist()
        assert tok.decode(learned, skip_special_tokens=False) == f"{b + 1}<|eot_id|>"
        assert batch["loss_mask"][b, n - 1 :].sum() == 0


def test_truncation_is_flagged_and_resume_is_exact(tmp_path, tok):
    long = [{"conversations": [{"from": "human", "value": "word " * 80}, {"from": "gpt", "value": "x"}]}]
    cfg = sft.SFTDataConfig(
        train_files=(_write(tmp_path, _examples(9) + long),), batch_size=2, buckets=(32,), max_length=32, seed=3
    )
    it = sft.SFTData(cfg, tok).iterator()
    seen = [next(it) for _ in range(3)]
    state = it.get_state()
    after = [next(it) for _ in range(4)]
    truncated = sum(int(b["truncated"].sum()) for b in seen + after)
    assert truncated >= 1 and all(b["input_ids"].shape == (2, 32) for b in seen + after)
    it2 = sft.SFTData(cfg, tok).iterator()
    it2.set_state(json.loads(json.dumps(state)))  # state survives JSON (it goes into checkpoints)
    for a in after:
        np.testing.assert_array_equal(next(it2)["input_ids"], a["input_ids"])


def test_shuffle_depends_on_seed(tmp_path, tok):
    f = _write(tmp_path, _examples(16))
    first = lambda seed: next(
        sft.SFTData(sft.SFTDataConfig(train_files=(f,), batch_size=4, seed=seed), tok).iterator()
    )["input_ids"]
    np.testing.assert_array_equal(first(1), first(1))
    assert not np.array_equal(first(1), first(2))


def test_image_examples_carry_tiles_and_cross_attention_mask(tmp_path, tok):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (60, 30), (200, 0, 0)).save(tmp_path / "images" / "a.png")
    ex = [
        {
            "image": "images/a.png",
            "conversations": [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}],
        }
    ] * 2
    cfg = sft.SFTDataConfig(train_files=(_write(tmp_path, ex),), batch_size=2, buckets=(32,), max_length=32)
    proc = processor.ImageProcessor(tile_size=28, max_tiles=4)
    batch = next(sft.SFTData(cfg, tok, image_processor=proc).iterator())
    assert batch["pixel_values"].shape == (2, 1, 4, 3, 28, 28)
    assert batch["aspect_ratio_mask"][0, 0].tolist() == [1, 1, 0, 0]  # 2:1 image -> 2 tiles
    ids = batch["input_ids"][0].tolist()
    p = ids.index(tok.image_token_id)
    cam = batch["cross_attention_mask"][0, :, 0]  # [T, C]
    assert cam[:p].sum() == 0 and cam[p:, :2].all() and cam[:, 2:].sum() == 0


def test_cross_attention_spans_match_transformers_rule():
    from transformers.models.mllama.processing_mllama import get_cross_attention_token_mask

    # Same spans; transformers writes "to the end" as -1 (one image) or len(ids) (several).
    to_end = lambda spans, n: [[a, n if b == -1 else b] for a, b in spans]
    for ids in ([5, 9, 1, 2, 9, 3], [9, 9, 1, 2], [1, 9, 2, 9, 9, 4, 5], [1, 9, 2], [1, 2]):
        expected = to_end(get_cross_attention_token_mask(ids, 9), len(ids))
        assert to_end(processor.image_token_spans(ids, 9), len(ids)) == expected
    assert processor.image_token_spans([1, 9, 2, 9, 9, 4, 5], 9) == [(1, 3), (3, -1), (4, -1)]


def test_bad_files_are_named(tmp_path, tok):
    with pytest.raises(UserError, match="does not exist"):
        sft.read_examples(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text("[{]")
    with pytest.raises(UserError, match="bad.json' is not valid JSON"):
        sft.read_examples(bad)
    good = json.dumps(_examples(1)[0])
    jl = tmp_path / "d.jsonl"
    jl.write_text(f"{good}\n{{oops\n\n{good}\n")
    with pytest.raises(UserError, match=r"d.jsonl:2: not valid JSON .*skip_bad_lines"):
        sft.read_examples(jl)
    assert len(sft.read_examples(jl, skip_bad_lines=True)) == 2
    f = _write(tmp_path, [{"conversations": [{"from": "human", "value": "hi"}]}], "noans.json")
    with pytest.raises(UserError, match=r"noans.json\[0\]: no assistant"):
        sft.read_examples(f)
    f = _write(
        tmp_path,
        [
            {
                "image": "missing.png",
                "conversations": [{"from": "human", "value": "<image>\nx"}, {"from": "gpt", "value": "y"}],
            }
        ],
        "img.json",
    )
    cfg = sft.SFTDataConfig(train_files=(f,), batch_size=1)
    with pytest.raises(UserError, match="has images but the model has no vision tower"):
        sft.SFTData(cfg, tok)
    with pytest.raises(UserError, match="missing.png' does not exist"):
        next(sft.SFTData(cfg, tok, image_processor=processor.ImageProcessor(tile_size=28)).iterator())
