"""Reading LoRA files: header first, only the tensors that map, content ids by bytes.

safetensors is the default; pickle-based files (.pt/.ckpt/.bin) are refused unless the
caller opts in, and then read only with ``torch.load(weights_only=True)``.

A LoRA file is untrusted input, so its header is read in bounded memory and checked whole
before any tensor is: at most ``MAX_HEADER_BYTES`` of JSON (safetensors' own limit), at most
``MAX_HEADER_ITEMS`` JSON values in it (counted on the bytes, before parsing), nested at
most as deep as the format needs, at most ``MAX_TENSORS`` tensors, each a mapping with a
known ``dtype``, a ``shape`` of at most ``MAX_DIMS`` non-negative integers and integer
``data_offsets`` inside the file that match the shape and overlap no other tensor's;
``__metadata__`` maps strings to strings. Any breach is a ``CorruptFileError`` naming the
file (and the tensor key where there is one), before the model is touched.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
from typing import Iterable

import torch

from .errors import CorruptFileError, UnsafeFormatError, shorten

#: Bytes of header JSON: safetensors' own limit (a real LoRA's header is well under 2 MB).
MAX_HEADER_BYTES = 100 * 1024 * 1024
#: JSON values a header may hold, bounded by its commas and colons before it is parsed (so a
#: header of millions of tiny entries is refused before it costs gigabytes of Python objects).
MAX_HEADER_ITEMS = 1_000_000
#: Tensors one file may declare (a kohya SDXL LoRA has about 2,600, a full LyCORIS ~15,000).
MAX_TENSORS = 100_000
#: Dimensions of one tensor (LoRA factors have 2, convolution ones 4).
MAX_DIMS = 8
_PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl")
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "F8_E4M3": 1, "F8_E5M2": 1}
_DTYPES = set(_ITEMSIZE)

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


def _read_json_header(path: str, name: str | None = None) -> tuple[dict, int]:
    """The header as parsed JSON (``__metadata__`` included) and the number of data bytes after it."""
    src = name or path
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CorruptFileError("file is shorter than a safetensors header", source=src)
        (n,) = struct.unpack("<Q", raw)
        if n <= 0 or n > MAX_HEADER_BYTES or 8 + n > size:
            # n itself is not echoed: it would show 8 bytes of a file that may not be a LoRA at all
            raise CorruptFileError(f"not a safetensors file (header length out of range: file size {size}, "
                                   f"limit {MAX_HEADER_BYTES})", source=src)
        raw = f.read(n)
    items = raw.count(b",") + raw.count(b":")
    if items > MAX_HEADER_ITEMS:
        raise CorruptFileError(f"safetensors header holds about {items} JSON values "
                               f"(limit {MAX_HEADER_ITEMS}, MAX_HEADER_ITEMS)", source=src)
    try:
        text = raw.decode("utf-8")
        del raw  # json.loads(raw) would hold the bytes, their text and the values at once: 3x the header
        header = json.loads(text)
    except ValueError as e:  # not UTF-8, not JSON, or an int of more than 4300 digits
        why = "not UTF-8" if isinstance(e, UnicodeDecodeError) else e
        raise CorruptFileError(f"safetensors header is not valid JSON: {why}", source=src) from e
    except RecursionError as e:  # the parser recurses per level; a tensor entry needs 3
        raise CorruptFileError("safetensors header is nested too deeply to parse", source=src) from e
    if not isinstance(header, dict):
        raise CorruptFileError("safetensors header is not a JSON object", source=src)
    return header, size - 8 - n


def read_header(path: str, name: str | None = None) -> dict[str, dict]:
    """Parse and check a safetensors header without reading any tensor data (see the module doc).
    Errors name the file ``name`` (what the user called it: a URI read from a cache blob) or ``path``."""
    src = name or path
    header, data_len = _read_json_header(path, src)
    _check_metadata(src, header.pop("__metadata__", None))
    if len(header) > MAX_TENSORS:
        raise CorruptFileError(f"safetensors header declares {len(header)} tensors (limit {MAX_TENSORS})", source=src)
    spans = sorted((_check_entry(src, key, info, data_len), key) for key, info in header.items())
    for ((_, end), before), ((start, _), key) in zip(spans, spans[1:]):
        if start < end:
            raise CorruptFileError(f"tensor data overlaps that of {shorten(before, 200)!r} (bytes {start}-{end})",
                                   source=src, key=key)
    return header


def _check_metadata(src: str, meta: object) -> None:
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise CorruptFileError("safetensors __metadata__ must map strings to strings", source=src)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_entry(src: str, key: str, info: object, data_len: int) -> tuple[int, int]:
    """``(start, end)`` of a well-formed tensor entry inside the data, else ``CorruptFileError``."""
    dtype = info.get("dtype") if isinstance(info, dict) else None
    shape = info.get("shape") if isinstance(info, dict) else None
    offsets = info.get("data_offsets") if isinstance(info, dict) else None
    if not (isinstance(dtype, str) and dtype in _DTYPES and isinstance(offsets, list) and len(offsets) == 2
            and all(_is_int(o) for o in offsets) and isinstance(shape, list) and len(shape) <= MAX_DIMS
            and all(_is_int(d) and d >= 0 for d in shape)):
        raise CorruptFileError("malformed tensor entry in header (needs a known dtype, a shape of at most "
                               f"{MAX_DIMS} sizes and two integer data_offsets)", source=src, key=key)
    start, end = offsets
    if not (0 <= start <= end <= data_len):
        raise CorruptFileError(
            f"tensor data [{start}, {end}) lies outside the file's {data_len} data bytes (truncated?)",
            source=src, key=key,
        )
    numel = 1
    for d in shape:
        numel *= d
    if numel * _ITEMSIZE[dtype] != end - start:
        raise CorruptFileError(f"tensor of shape {shape} and dtype {dtype} needs {numel * _ITEMSIZE[dtype]} bytes, "
                               f"its data_offsets give {end - start}", source=src, key=key)
    return start, end


def read_metadata(path: str, name: str | None = None) -> dict[str, str]:
    """The header's ``__metadata__`` (strings to strings), read as boundedly as ``read_header``."""
    header, _ = _read_json_header(path, name)
    meta = header.get("__metadata__") or {}
    _check_metadata(name or path, meta)
    return dict(meta)


def load_tensors(path: str, keys: Iterable[str], name: str | None = None) -> dict[str, torch.Tensor]:
    """Read only ``keys`` (memory-mapped); errors name the file (``name`` or ``path``) and the key."""
    from safetensors import safe_open

    src = name or path
    out: dict[str, torch.Tensor] = {}
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            for key in keys:
                try:
                    out[key] = f.get_tensor(key)
                except Exception as e:  # safetensors raises its own error types
                    raise CorruptFileError(f"cannot read tensor: {e}", source=src, key=key) from e
    except CorruptFileError:
        raise
    except Exception as e:
        raise CorruptFileError(f"cannot open safetensors file: {e}", source=src) from e
    return out


def load_pickle_state_dict(path: str, allow_pickle: bool, name: str | None = None) -> dict[str, torch.Tensor]:
    """Pickle-based checkpoints: refused unless opted in; then tensors only."""
    src = name or path
    if not allow_pickle:
        raise UnsafeFormatError(
            "pickle-based file refused (it can run code when loaded); convert it to safetensors "
            "or pass allow_pickle=True to read it with torch.load(weights_only=True)",
            source=src,
        )
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CorruptFileError(f"cannot read pickle checkpoint with weights_only=True: {e}", source=src) from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CorruptFileError("checkpoint is not a flat dict of tensors", source=src)
    return dict(sd)
