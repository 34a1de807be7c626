"""Broken HF checkpoints (issue 23 items 3, 4): truncated or inconsistent safetensors and config.json
fields of the wrong type fail with one line naming the file and the tensor or field, exit code 2 from
the CLI, and leave the files as they were. No torch needed: the folders are written by our own
`save_pretrained` from a tiny random model."""

from __future__ import annotations

import json
import os
import shutil
import struct

import numpy as np
import pytest

from sftrl_jax import cli
from sftrl_jax.errors import UserError
from sftrl_jax.models import build, convert, safetensors_io
from sftrl_jax.models import config as config_lib


def _folder(path: str, *, tied: bool = False) -> str:
    cfg = config_lib.LlamaConfig.tiny(tie_word_embeddings=tied)
    convert.save_pretrained(build.create_model(cfg, seed=0), path)
    return path


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _folder(str(tmp_path_factory.mktemp("hf_llama")))


@pytest.fixture(scope="module")
def llama_tied(tmp_path_factory):
    return _folder(str(tmp_path_factory.mktemp("hf_llama_tied")), tied=True)


@pytest.fixture
def copy(llama, tmp_path):
    dst = str(tmp_path / "copy")
    shutil.copytree(llama, dst)
    return dst


def _weights(folder: str) -> str:
    return os.path.join(folder, safetensors_io.SINGLE_FILE)


def _header(file: str) -> tuple[dict, bytes]:
    with open(file, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _write(file: str, header: dict | list, data: bytes, *, length: int | None = None) -> None:
    raw = json.dumps(header).encode()
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(raw) if length is None else length) + raw + data)


def _one_line_error(fn, *needles: str) -> str:
    with pytest.raises(UserError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


def _last_tensor(header: dict) -> str:
    return max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])


# ------------------------------------------------------------------------------------------- safetensors


def test_truncated_file_names_file_and_tensor(copy):
    file = _weights(copy)
    header, _ = _header(file)
    size = os.path.getsize(file)
    with open(file, "r+b") as f:
        f.truncate(size - 100)
    last = _last_tensor(header)
    _one_line_error(lambda: convert.from_pretrained(copy), file, repr(last), "truncated")
    assert os.path.getsize(file) == size - 100  # nothing deleted or rewritten


def test_shrunk_data_offsets_name_the_tensor_and_sizes(copy):
    file = _weights(copy)
    header, data = _header(file)
    key = "model.norm.weight"
    start, end = header[key]["data_offsets"]
    header[key]["data_offsets"] = [start, end - 4]
    _write(file, header, data)
    shape = header[key]["shape"]
    _one_line_error(
        lambda: safetensors_io.SafetensorsFile(file), file, repr(key), f"{end - 4 - start} bytes", f"{shape}", "F32"
    )


@pytest.mark.parametrize("length", [2**62, 2**64 - 1, 0])
def test_absurd_header_length(copy, length):
    file = _weights(copy)
    header, data = _header(file)
    _write(file, header, data, length=length)
    _one_line_error(lambda: safetensors_io.SafetensorsFile(file), file, "header")


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda h, k: [1, 2], "header is a JSON list"),
        (lambda h, k: h[k].update(shape=[-1, 64]), "shape"),
        (lambda h, k: h[k].update(shape="64"), "shape"),
        (lambda h, k: h[k].update(data_offsets=[0]), "data_offsets"),
        (lambda h, k: h[k].update(data_offsets=[10**30, 10**30 + 4]), "data_offsets"),
        (lambda h, k: h[k].__delitem__("dtype"), "dtype"),
        (lambda h, k: h.update({k: "x"}), "entry"),
        (lambda h, k: h.update(__metadata__=[1]), "__metadata__"),
    ],
)
def test_inconsistent_headers_name_the_tensor(copy, edit, needle):
    file = _weights(copy)
    header, data = _header(file)
    key = "model.norm.weight"
    header = edit(header, key) or header
    _write(file, header, data)
    _one_line_error(lambda: safetensors_io.SafetensorsFile(file), file, needle)


def test_overlapping_tensors_are_refused(copy):
    file = _weights(copy)
    header, data = _header(file)
    a, b = "model.norm.weight", "model.layers.0.input_layernorm.weight"
    header[b]["data_offsets"] = header[a]["data_offsets"]
    _write(file, header, data)
    _one_line_error(lambda: safetensors_io.SafetensorsFile(file), file, "overlap")


def test_bad_index_file(copy):
    with open(os.path.join(copy, safetensors_io.INDEX_FILE), "w") as f:
        f.write("[1, 2")
    _one_line_error(lambda: convert.from_pretrained(copy), safetensors_io.INDEX_FILE, "invalid JSON")
    with open(os.path.join(copy, safetensors_io.INDEX_FILE), "w") as f:
        json.dump([1], f)
    _one_line_error(lambda: convert.from_pretrained(copy), safetensors_io.INDEX_FILE, "weight_map")


def test_cli_convert_of_a_truncated_checkpoint(copy, tmp_path, capsys):
    file = _weights(copy)
    with open(file, "r+b") as f:
        f.truncate(os.path.getsize(file) - 100)
    code = cli.main(["convert", "--hf", copy, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and err.count("\n") == 1 and file in err, err


# ------------------------------------------------------------------------------------------- config.json


def _edit_config(folder: str, fn) -> str:
    file = os.path.join(folder, "config.json")
    with open(file) as f:
        d = json.load(f)
    d = fn(d) or d
    with open(file, "w") as f:
        json.dump(d, f)
    return file


@pytest.mark.parametrize(
    "field, value, needle",
    [
        ("tie_word_embeddings", "false", "'tie_word_embeddings' must be true or false, got 'false'"),
        ("hidden_size", 32.9, "'hidden_size' must be an integer, got 32.9"),
        ("hidden_size", True, "'hidden_size' must be an integer, got True"),
        ("num_hidden_layers", "two", "'num_hidden_layers' must be an integer, got 'two'"),
        ("rms_norm_eps", [1], "'rms_norm_eps' must be a number, got [1]"),
        ("rms_norm_eps", "1e-5", "'rms_norm_eps' must be a number"),
        ("rope_theta", "big", "'rope_theta' must be a number"),
        ("vocab_size", -5, "'vocab_size' must be a positive integer, got -5"),
        ("eos_token_id", "eos", "'eos_token_id' must be an integer, a list of integers or null"),
        ("bos_token_id", 1.5, "'bos_token_id' must be an integer or null"),
        ("rope_scaling", [1], "'rope_scaling' must be an object"),
    ],
)
def test_config_field_types_are_checked(copy, field, value, needle):
    file = _edit_config(copy, lambda d: d.update({field: value}))
    _one_line_error(lambda: convert.from_pretrained(copy), file, needle)
    _one_line_error(lambda: convert.read_config(copy), file, needle)


def test_rope_scaling_values_are_checked(copy):
    file = _edit_config(
        copy,
        lambda d: d.update(
            rope_scaling={"rope_type": "llama3", "factor": "x", "low_freq_factor": 1, "high_freq_factor": 4}
        ),
    )
    _one_line_error(lambda: convert.read_config(copy), file, "'rope_scaling.factor' must be a number, got 'x'")


def test_config_that_is_not_an_object(copy):
    file = _edit_config(copy, lambda d: [d])
    _one_line_error(lambda: convert.read_config(copy), file, "must be a JSON object, got a list")


def test_config_invalid_utf8(copy):
    file = os.path.join(copy, "config.json")
    with open(file, "wb") as f:
        f.write(b'{"hidden_size": "\xff"}')
    _one_line_error(lambda: convert.read_config(copy), file, "UTF-8")


def test_tied_checkpoint_with_a_stored_lm_head(llama_tied, tmp_path):
    """tie_word_embeddings=true and an lm_head.weight in the file: used only if equal to embed_tokens."""
    folder = str(tmp_path / "tied")
    shutil.copytree(llama_tied, folder)
    file = _weights(folder)
    files, _ = safetensors_io.open_folder(folder)
    tensors = {k: np.array(files[safetensors_io.SINGLE_FILE].get(k)) for k in files[safetensors_io.SINGLE_FILE].keys()}
    embed = tensors["model.embed_tokens.weight"]

    def write(lm_head):
        t = {**tensors, "lm_head.weight": lm_head}
        safetensors_io.write_file(file, [(k, v.shape, v.dtype) for k, v in t.items()], t.__getitem__)

    write(embed.copy())  # identical: fine (some tied checkpoints store it)
    model = convert.from_pretrained(folder)
    assert "lm_head" not in build.flat_params(model)
    different = embed.copy()
    different[3, 5] += 0.5
    write(different)
    _one_line_error(
        lambda: convert.from_pretrained(folder), file, "'lm_head.weight'", "tie_word_embeddings", "embed_tokens", "0.5"
    )


def test_cli_convert_of_a_bad_config(copy, tmp_path, capsys):
    file = _edit_config(copy, lambda d: d.update(tie_word_embeddings="false"))
    code = cli.main(["convert", "--hf", copy, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1, err
    assert file in err and "tie_word_embeddings" in err
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("content", [b"[1, 2]", b'{"architecture": ', b"\xff\xfe"])
def test_our_model_config_json_is_checked(tmp_path, content):
    from sftrl_jax.models import checkpoint

    file = tmp_path / checkpoint.CONFIG_FILE
    file.write_bytes(content)
    _one_line_error(lambda: checkpoint.read_checkpoint_config(str(tmp_path)), str(file))
