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
