"""Reading LoRA files: header first, only the tensors that map, content ids by bytes.

safetensors is the default; pickle-based files (.pt/.ckpt/.bin) are refused unless the
caller opts in, and then read only with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
from typing import Iterable

import torch

from .errors import CorruptFileError, UnsafeFormatError

_MAX_HEADER = 100 * 1024 * 1024
_PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl")
_DTYPES = {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2"}

_sha_memo: dict[tuple[str, int, int], str] = {}
_sha_lock = threading.Lock()


def file_sha256(path: str, chunk: int = 8 << 20) -> str:
    """sha256 of the file bytes, streamed, memoized by (path, size, mtime_ns)."""
    st = os.stat(path)
    memo_key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    with _sha_lock:
        hit = _sha_memo.get(memo_key)
    if hit is not None:
        return hit
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    digest = h.hexdigest()
    with _sha_lock:
        _sha_memo[memo_key] = digest
    return digest


def is_pickle_file(path: str) -> bool:
    """By suffix, else by magic: torch's zip container or a raw pickle (protocol 2-5).

    A safetensors file starts with its header length (little-endian u64, < 100 MB), so its
    bytes 4-7 are zero, which a pickle stream's opening bytes never are together.
    """
    lower = path.lower()
    if lower.endswith((".safetensors", ".sft")):
        return False
    if lower.endswith(_PICKLE_SUFFIXES):
        return True
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:4] == b"PK\x03\x04":
        return True
    return len(head) == 8 and head[0] == 0x80 and 2 <= head[1] <= 5 and head[4:8] != b"\x00" * 4


def read_header(path: str) -> dict[str, dict]:
    """Parse and check a safetensors header without reading any tensor data."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CorruptFileError("file is shorter than a safetensors header", source=path)
        (n,) = struct.unpack("<Q", raw)
        if n <= 0 or n > _MAX_HEADER or 8 + n > size:
            raise CorruptFileError(f"not a safetensors file (header length {n}, file size {size})", source=path)
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CorruptFileError(f"safetensors header is not valid JSON: {e}", source=path) from e
    if not isinstance(header, dict):
        raise CorruptFileError("safetensors header is not a JSON object", source=path)
    header.pop("__metadata__", None)
    data_len = size - 8 - n
    for key, info in header.items():
        _check_entry(path, key, info, data_len)
    return header


def _check_entry(path: str, key: str, info: object, data_len: int) -> None:
    ok = isinstance(info, dict) and info.get("dtype") in _DTYPES
    offsets = info.get("data_offsets") if isinstance(info, dict) else None
    if not ok or not (isinstance(offsets, list) and len(offsets) == 2):
        raise CorruptFileError("malformed tensor entry in header", source=path, key=key)
    start, end = offsets
    if not (0 <= start <= end <= data_len):
        raise CorruptFileError(
            f"tensor data [{start}, {end}) lies outside the file's {data_len} data bytes (truncated?)",
            source=path, key=key,
        )


def read_metadata(path: str) -> dict[str, str]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        meta = json.loads(f.read(n)).get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()}


def load_tensors(path: str, keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """Read only ``keys`` (memory-mapped); errors name the file and the key."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            for key in keys:
                try:
                    out[key] = f.get_tensor(key)
                except Exception as e:  # safetensors raises its own error types
                    raise CorruptFileError(f"cannot read tensor: {e}", source=path, key=key) from e
    except CorruptFileError:
        raise
    except Exception as e:
        raise CorruptFileError(f"cannot open safetensors file: {e}", source=path) from e
    return out


def load_pickle_state_dict(path: str, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """Pickle-based checkpoints: refused unless opted in; then tensors only."""
    if not allow_pickle:
        raise UnsafeFormatError(
            "pickle-based file refused (it can run code when loaded); convert it to safetensors "
            "or pass allow_pickle=True to read it with torch.load(weights_only=True)",
            source=path,
        )
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CorruptFileError(f"cannot read pickle checkpoint with weights_only=True: {e}", source=path) from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CorruptFileError("checkpoint is not a flat dict of tensors", source=path)
    return dict(sd)
