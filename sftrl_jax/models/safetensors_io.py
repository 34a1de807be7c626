"""Streaming safetensors reader and writer over numpy (bfloat16 via ml_dtypes).

The `safetensors` package's numpy API cannot return bfloat16, the dtype every Llama checkpoint
uses, and writing through it needs every tensor in memory at once. The format is simple (an 8-byte
little-endian header length, a JSON header of dtype / shape / byte offsets, then the raw bytes), so
we memory-map files and read one tensor at a time, and write a shard tensor by tensor after laying
out its header from shapes alone.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence

import ml_dtypes
import numpy as np

from sftrl_jax.errors import UserError

DTYPES: Mapping[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class SafetensorsFile:
    """One .safetensors file: `keys()`, `shape(key)`, `get(key)` (a numpy array, read lazily)."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
        except FileNotFoundError:
            raise UserError(f"missing safetensors file {path}") from None
        except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: not a valid safetensors file ({e})") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self.header = header
        self._data_start = 8 + n
        self._data = None

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.header[key]["shape"])

    def get(self, key: str) -> np.ndarray:
        info = self.header[key]
        if info["dtype"] not in DTYPES:
            raise UserError(f"{self.path}: tensor {key!r} has unsupported dtype {info['dtype']}")
        if self._data is None:
            self._data = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self._data_start)
        start, end = info["data_offsets"]
        return self._data[start:end].view(DTYPES[info["dtype"]]).reshape(info["shape"])

    def close(self):
        self._data = None


def open_folder(folder: str) -> tuple[dict[str, SafetensorsFile], dict[str, str]]:
    """The safetensors files of a checkpoint folder and the map key -> file name.

    Reads `model.safetensors.index.json` when present (sharded checkpoint) and checks every shard it
    names exists and holds the keys the index says; otherwise reads `model.safetensors`.
    """
    index_path = os.path.join(folder, INDEX_FILE)
    if os.path.exists(index_path):
        with open(index_path) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserError(f"{index_path}: no 'weight_map'")
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not os.path.exists(os.path.join(folder, n))]
        if missing:
            raise UserError(f"{folder}: shard file(s) {missing} listed in {INDEX_FILE} are missing")
        files = {n: SafetensorsFile(os.path.join(folder, n)) for n in names}
        for key, name in weight_map.items():
            if key not in files[name].header:
                raise UserError(f"{os.path.join(folder, name)}: has no tensor {key!r} although {INDEX_FILE} says so")
        return files, dict(weight_map)
    single = os.path.join(folder, SINGLE_FILE)
    if not os.path.exists(single):
        present = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        raise UserError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE} (found: {present[:10]})")
    f = SafetensorsFile(single)
    return {SINGLE_FILE: f}, dict.fromkeys(f.keys(), SINGLE_FILE)


def _header(entries: Sequence[tuple[str, tuple[int, ...], np.dtype]]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, shape, dtype in entries:
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[key] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_file(
    path: str, entries: Sequence[tuple[str, tuple[int, ...], np.dtype]], get: Callable[[str], np.ndarray]
) -> None:
    """Write `entries` (key, shape, dtype) to `path`, fetching each tensor with `get(key)` in turn."""
    with open(path, "wb") as f:
        f.write(_header(entries))
        for key, shape, dtype in entries:
            arr = np.ascontiguousarray(get(key))
            if arr.shape != tuple(shape) or arr.dtype != dtype:
                raise ValueError(f"{key}: got {arr.shape} {arr.dtype}, header says {tuple(shape)} {dtype}")
            f.write(arr.tobytes())


def write_folder(
    folder: str,
    entries: Iterable[tuple[str, tuple[int, ...], np.dtype]],
    get: Callable[[str], np.ndarray],
    *,
    max_shard_bytes: int = 5 * 2**30,
) -> list[str]:
    """Write a (possibly sharded) checkpoint: `model.safetensors`, or `model-0000i-of-0000n.safetensors`
    plus `model.safetensors.index.json` once the tensors exceed `max_shard_bytes`."""
    entries = list(entries)
    shards: list[list] = [[]]
    size = total = 0
    for entry in entries:
        n = int(np.prod(entry[1], dtype=np.int64)) * entry[2].itemsize
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += n
        total += n
    os.makedirs(folder, exist_ok=True)
    if len(shards) == 1:
        write_file(os.path.join(folder, SINGLE_FILE), shards[0], get)
        return [SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        write_file(os.path.join(folder, name), shard, get)
        weight_map.update(dict.fromkeys((e[0] for e in shard), name))
    with open(os.path.join(folder, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names
