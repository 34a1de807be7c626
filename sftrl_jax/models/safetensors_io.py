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
MAX_HEADER_BYTES = 100 * 2**20  # the format's own limit (safetensors refuses larger headers)


class SafetensorsFile:
    """One .safetensors file: `keys()`, `shape(key)`, `get(key)` (a numpy array, read lazily).

    The header is checked against the file when it is opened, so a truncated or inconsistent file
    fails with the file and tensor named instead of a reshape error (or a MemoryError on an absurd
    header length) deep inside a load."""

    def __init__(self, path: str):
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if not 2 <= n <= min(MAX_HEADER_BYTES, size - 8):
                    raise UserError(
                        f"{path}: not a valid safetensors file (header length {n} in a file of {size} bytes; "
                        f"at most {MAX_HEADER_BYTES}): truncated or not safetensors"
                    )
                header = json.loads(f.read(n))
        except FileNotFoundError:
            raise UserError(f"missing safetensors file {path}") from None
        except IsADirectoryError:
            raise UserError(f"{path}: is a folder, not a safetensors file") from None
        except (struct.error, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise UserError(f"{path}: not a valid safetensors file ({type(e).__name__}: {e})") from None
        if not isinstance(header, dict):
            raise UserError(f"{path}: not a valid safetensors file (the header is a JSON {type(header).__name__})")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict):
            raise UserError(f"{path}: header field '__metadata__' must be an object, got {metadata!r:.80}")
        self.metadata = metadata
        self.header = header
        self._data_start = 8 + n
        _check_entries(path, header, size - self._data_start)
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


def _check_entries(path: str, header: dict, data_bytes: int) -> None:
    """Every tensor entry: dtype, shape and offsets well formed, its bytes inside the data section and
    as many as dtype and shape need, no two tensors overlapping."""
    spans = []
    for key, info in header.items():
        where = f"{path}: tensor {key!r}"
        if not isinstance(info, dict):
            raise UserError(f"{where}: header entry must be an object, got {info!r:.80}")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str):
            raise UserError(f"{where}: header entry has no string 'dtype' (got {dtype!r:.80})")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise UserError(f"{where}: 'shape' must be a list of integers >= 0, got {shape!r:.80}")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
            raise UserError(f"{where}: 'data_offsets' must be two integers [begin, end], got {offsets!r:.80}")
        start, end = offsets
        if not start <= end:
            raise UserError(f"{where}: 'data_offsets' {offsets} end before they begin")
        if end > data_bytes:
            raise UserError(
                f"{where}: 'data_offsets' {offsets} reach past the {data_bytes} data bytes of the file "
                "(truncated file?)"
            )
        if dtype in DTYPES:
            need = int(np.prod(shape, dtype=object)) * DTYPES[dtype].itemsize
            if end - start != need:
                raise UserError(
                    f"{where}: 'data_offsets' {offsets} hold {end - start} bytes but dtype {dtype} shape {shape} "
                    f"needs {need}"
                )
        if end > start:
            spans.append((start, end, key))
    spans.sort()
    for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:]):
        if start_b < end_a:
            raise UserError(f"{path}: tensors {a!r} and {b!r} overlap in the data section")


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def open_folder(folder: str) -> tuple[dict[str, SafetensorsFile], dict[str, str]]:
    """The safetensors files of a checkpoint folder and the map key -> file name.

    Reads `model.safetensors.index.json` when present (sharded checkpoint) and checks every shard it
    names exists and holds the keys the index says; otherwise reads `model.safetensors`.
    """
    index_path = os.path.join(folder, INDEX_FILE)
    if os.path.exists(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                index = json.load(f)
        except (ValueError, RecursionError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError included
            raise UserError(f"{index_path}: invalid JSON ({type(e).__name__}: {e})") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise UserError(f"{index_path}: no 'weight_map' object of tensor name -> file name")
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
