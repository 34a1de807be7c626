"""The shipped study base: its files are the recorded ones, it loads, and it reproduces its probe."""

import hashlib
import json
import os

import pytest

from sftrl_jax import study

BASE = study.SHIPPED_BASE
RECORD = os.path.join(BASE, "base.json")


def _record():
    with open(RECORD) as f:
        return json.load(f)


def test_files_are_the_recorded_ones_and_small():
    rec = _record()
    total = 0
    for name, digest in rec["sha256"].items():
        path = os.path.join(BASE, name)
        with open(path, "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == digest, name
        total += os.path.getsize(path)
    assert total <= 25 * 2**20, total  # at most ~25 MB on disk
    assert rec["command"] and len(rec["commit"]) == 40


def test_it_loads_as_the_recorded_model_and_reproduces_its_probe():
    from sftrl_jax.models import param_count
    from sftrl_jax.train.state import load_for_eval

    rec = _record()
    model, tok, _ = load_for_eval(BASE, "gp-l")
    assert int(param_count(model.config)) == rec["parameters"]
    assert tok.vocab_size <= model.config.text.vocab_size
    cfg = study.StudyConfig(base=BASE, probe_episodes=rec["probe_episodes"], progress=False)
    got = study.probe_base(cfg, BASE)
    for name, want in rec["probe"].items():
        assert got[name]["n"] == want["n"]
        assert got[name]["success"] == pytest.approx(want["success"], abs=0.5 / want["n"]), (name, got, want)


def _damaged_copy(tmp_path, name: str, offset: int, data: bytes):
    """A copy of the shipped base with `data` written over `name` at `offset` (from the end if < 0)."""
    import shutil

    copy = tmp_path / "base"
    shutil.copytree(BASE, copy)
    path = copy / name
    raw = bytearray(path.read_bytes())
    offset %= len(raw)
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))
    return copy, hashlib.sha256(bytes(raw)).hexdigest()


@pytest.mark.parametrize(
    "what, offset, data",
    [
        ("a flipped bit", -4096, None),
        ("NaN bytes", -64, b"\x00\x00\xc0\x7f" * 4),  # float32 NaN over four weights
    ],
    ids=["flipped-bit", "nan-bytes"],
)
def test_a_damaged_base_is_refused_at_load(tmp_path, capsys, what, offset, data):
    from sftrl_jax import cli, models
    from sftrl_jax.errors import UserError
    from sftrl_jax.train.state import ModelSection, load_model

    if data is None:
        with open(os.path.join(BASE, "model.safetensors"), "rb") as f:
            f.seek(offset, os.SEEK_END)
            data = bytes([f.read(1)[0] ^ 0x10])
    copy, actual = _damaged_copy(tmp_path, "model.safetensors", offset, data)
    want = _record()["sha256"]["model.safetensors"]
    message = rf"model\.safetensors: sha256 is {actual}, expected {want}"
    with pytest.raises(UserError, match=message):
        models.from_pretrained(str(copy))
    with pytest.raises(UserError, match=message):  # the study's and the demo's path (model.init)
        load_model(ModelSection(init=str(copy)))
    assert cli.main(["sample", "--model", str(copy), "--prompt", "A 3 K 10"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and actual in err[0] and want in err[0], err


def test_the_shipped_base_and_tokenizer_verify(tmp_path):
    """The real files pass (and a second load is remembered, not re-hashed); so does an intact copy."""
    import shutil
    import time

    from sftrl_jax import integrity, models
    from sftrl_jax.data import tokenizer as tok_lib

    assert set(integrity.recorded_digests(BASE)) == {"config.json", "model.safetensors"}
    integrity.verify_folder(BASE)
    start = time.perf_counter()
    integrity.verify_folder(BASE)
    assert time.perf_counter() - start < 0.005
    models.from_pretrained(shutil.copytree(BASE, tmp_path / "base"))
    tok = tok_lib.default_tokenizer_path()
    assert set(integrity.recorded_digests(tok)) == {"chat_template.jinja", "tokenizer.json", "tokenizer_config.json"}
    tok_lib.load_tokenizer()


def test_a_changed_shipped_tokenizer_is_refused(tmp_path):
    import shutil

    from sftrl_jax.data import tokenizer as tok_lib
    from sftrl_jax.errors import UserError

    copy = shutil.copytree(tok_lib.default_tokenizer_path(), tmp_path / "tok")
    path = copy / "tokenizer_config.json"
    path.write_text(path.read_text().replace("<|eot_id|>", "<|eom_id|>", 1))
    with pytest.raises(UserError, match=r"tokenizer_config\.json: sha256 is [0-9a-f]{64}, expected [0-9a-f]{64}"):
        tok_lib.load_tokenizer(copy)
    (copy / "tokenizer.json").unlink()
    path.write_text(path.read_text().replace("<|eom_id|>", "<|eot_id|>", 1))
    with pytest.raises(UserError, match=r"tokenizer\.json: missing, but the folder's sha256 record lists it"):
        tok_lib.load_tokenizer(copy)
