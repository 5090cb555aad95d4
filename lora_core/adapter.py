"""The canonical adapter: ``{target: LoraLayer(A, B, alpha)}`` plus a content id.

``A`` is (rank, in) and ``B`` (out, rank), as stored in the file (no scale folded: the
strength is not known until composition). ``target`` is the module path with container
prefixes stripped, in the file's own naming; binding it to a model is compose's job.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Iterable, Mapping, Protocol, Union

import torch

from . import diffs
from .formats import nunchaku_converted
from .errors import CorruptFileError, NonFiniteError, ShapeMismatchError
from .keymap import KeyMap, classify
from .safetensors_io import (
    file_sha256,
    is_pickle_file,
    load_pickle_state_dict,
    load_tensors,
    read_header,
)


@dataclass(frozen=True, eq=False)
class LoraLayer:
    A: torch.Tensor  # (rank, in)
    B: torch.Tensor  # (out, rank)
    alpha: float
    #: a nunchaku-converted file's SVDQ factors: their leading ranks may be the base checkpoint's
    #: own branch, checked and dropped against the model (``formats.nunchaku_converted.bind``)
    may_hold_base: bool = False

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def scale(self) -> float:
        """alpha / rank: folded once, per component, at composition time."""
        return self.alpha / self.rank


@dataclass(frozen=True, eq=False)
class Adapter:
    layers: Mapping[str, LoraLayer]
    content_id: str
    source: str = "<state dict>"
    scheme: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    #: full-weight diffs: ``{target: {"weight"|"bias": delta as stored}}`` (``lora_core.diffs``)
    diffs: Mapping[str, Mapping[str, torch.Tensor]] = field(default_factory=dict)
    #: ``(target, "weight"|"bias") -> the file's key``, to name it in errors
    diff_keys: Mapping[tuple[str, str], str] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        lora = sum(l.A.numel() * l.A.element_size() + l.B.numel() * l.B.element_size() for l in self.layers.values())
        return lora + diffs.nbytes(self.diffs)

    def __repr__(self) -> str:
        return f"Adapter({self.source!r}, {len(self.layers)} layers, id={self.content_id[:12]})"


Source = Union[str, os.PathLike, Mapping[str, torch.Tensor], Adapter]


class Fetched(Protocol):
    """What a store's ``fetch`` returns: a local file and its sha256 (``storage.store.FetchResult``)."""

    path: str
    sha256: str


class Store(Protocol):
    """Anything with ``fetch(uri)``, such as ``storage.store.LoraStore``."""

    def fetch(self, uri: str) -> Fetched: ...


#: How a remote LoRA reaches local disk: a store (its sha256 is then reused, not recomputed)
#: or a plain callable ``uri -> local path``.
Fetcher = Union[Store, Callable[[str], str]]


def is_remote(path: str) -> bool:
    """A URL for a fetcher (``s3://``, ``https://``, ...); plain paths and ``file://`` are local."""
    return "://" in path and not path.startswith("file://")


def local_file(path: str, fetch: Fetcher | None = None, storage_options: dict | None = None) -> tuple[str, str | None]:
    """``(local path, sha256 if the fetcher knew it)`` for a path or URL.

    Only URLs are fetched. Without ``fetch`` they go through the process-wide
    ``storage.store.default_store(storage_options)``, imported here on first use so that
    ``import lora_core`` does not import fsspec.
    """
    if not is_remote(path):
        return path.removeprefix("file://"), None
    if fetch is None:
        from storage.store import default_store

        fetch = default_store(storage_options)
    if callable(getattr(fetch, "fetch", None)):
        fetched = fetch.fetch(path)
        return fetched.path, fetched.sha256
    return os.fspath(fetch(path)), None


def load_adapter(
    source: Source, *, allow_pickle: bool = False, storage_options: dict | None = None, fetch: Fetcher | None = None
) -> Adapter:
    """A path, an fsspec URL, a state dict or an Adapter -> a checked Adapter.

    A URL is fetched by ``fetch`` (a store or ``uri -> local path``); without one, by the
    default store for ``storage_options``.
    """
    if isinstance(source, Adapter):
        return source
    if isinstance(source, Mapping):
        return adapter_from_state_dict(dict(source), source="<state dict>", content_id=state_dict_id(source))
    path, _ = local_file(os.fspath(source), fetch, storage_options)
    return load_adapter_file(path, allow_pickle=allow_pickle)


def load_adapter_file(path: str, *, allow_pickle: bool = False, name: str | None = None) -> Adapter:
    """The adapter in the local file ``path``. ``name`` is what the user called the file (a
    URI whose bytes were fetched to ``path``, a cache blob): the adapter's ``source`` and every
    error name it instead of ``path``."""
    src = name or path
    if not os.path.isfile(path):
        raise CorruptFileError("no such LoRA file", source=src)
    if is_pickle_file(path):
        sd = load_pickle_state_dict(path, allow_pickle, src)
        return adapter_from_state_dict(sd, source=src, content_id=file_sha256(path))
    header = read_header(path, src)  # fails on bad bytes before any tensor is read
    keymap, diff_keys = classify_keys(header.keys(), src)
    tensors = load_tensors(path, header.keys(), src)
    return _build(keymap, tensors, source=src, content_id=file_sha256(path), diff_keys=diff_keys)


def adapter_from_state_dict(sd: dict[str, torch.Tensor], *, source: str, content_id: str) -> Adapter:
    keymap, diff_keys = classify_keys(sd.keys(), source)
    return _build(keymap, sd, source=source, content_id=content_id, diff_keys=diff_keys)


def classify_keys(keys: Iterable[str], source: str) -> tuple[KeyMap, dict[str, dict[str, str]]]:
    """The low-rank keys' scheme (``keymap.classify``) and the full-weight diff keys
    (``{target: {"weight"|"bias": key}}``); a file of diffs only is scheme ``diff``."""
    rest, diff_keys = diffs.split_keys(keys)
    if diff_keys and not rest:
        return KeyMap(scheme="diff", entries={}), diff_keys
    return classify(rest, source=source), diff_keys


def state_dict_id(sd: Mapping[str, torch.Tensor]) -> str:
    """Content id of an in-memory state dict: keys, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for key in sorted(sd):
        t = sd[key].detach().reshape(-1).contiguous().cpu()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _build(keymap, tensors: Mapping[str, torch.Tensor], *, source: str, content_id: str,
           diff_keys: Mapping[str, Mapping[str, str]] | None = None) -> Adapter:
    converted = keymap.scheme in nunchaku_converted.NAMES
    layers = converted_layers(keymap.entries, tensors, source) if converted else {}
    for target, roles in ({} if converted else keymap.entries).items():
        a = _matrix(tensors[roles["A"]], source, roles["A"])
        b = _matrix(tensors[roles["B"]], source, roles["B"])
        if a.shape[0] != b.shape[1]:
            raise ShapeMismatchError(
                f"down has rank {a.shape[0]} but up has rank {b.shape[1]}", source=source, key=roles["B"]
            )
        alpha = float(a.shape[0])
        if "alpha" in roles:
            alpha = _alpha(tensors[roles["alpha"]], source, roles["alpha"])
        layers[target] = LoraLayer(A=a, B=b, alpha=alpha)
    found: dict[str, dict[str, torch.Tensor]] = {}
    for target, params in (diff_keys or {}).items():
        found[target] = {p: _diff(tensors[k], source, k) for p, k in params.items()}
    names = {(t, p): k for t, ps in (diff_keys or {}).items() for p, k in ps.items()}
    return Adapter(layers=MappingProxyType(layers), content_id=content_id, source=source, scheme=keymap.scheme,
                   diffs=MappingProxyType(found), diff_keys=MappingProxyType(names))


def converted_layers(entries: Mapping[str, Mapping[str, str]], tensors: Mapping[str, torch.Tensor],
                     source: str) -> dict[str, LoraLayer]:
    """A nunchaku-converted file's layers (``formats/nunchaku_converted.py``): each factor checked
    as any LoRA's, packed ones unpacked, scale 1. ``tensors`` may be meta (a header: shapes only)."""
    checked = {k: _matrix(tensors[k], source, k) for roles in entries.values() for k in roles.values()}
    return {target: LoraLayer(A=a, B=b, alpha=float(a.shape[0]), may_hold_base=base)
            for target, (a, b, base) in nunchaku_converted.factors(entries, checked, source).items()}


def _finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in ``t``. torch has no ``isfinite`` for its 8-bit floats: those are checked
    in fp16, which holds every e4m3 / e5m2 value exactly (NaN and Inf included)."""
    return bool(torch.isfinite(t if t.element_size() > 1 else t.to(torch.float16)).all())


def _diff(t: torch.Tensor, source: str, key: str) -> torch.Tensor:
    if not t.is_floating_point():
        raise CorruptFileError(f"full-weight diff has non-float dtype {t.dtype}", source=source, key=key)
    if not _finite(t):
        raise NonFiniteError("full-weight diff contains NaN or Inf", source=source, key=key)
    return t


def _matrix(t: torch.Tensor, source: str, key: str) -> torch.Tensor:
    if t.dim() == 4 and t.shape[2:] == (1, 1):
        t = t[:, :, 0, 0]  # 1x1 conv LoRAs are linear maps
    if t.dim() != 2:
        raise ShapeMismatchError(f"expected a 2-D LoRA factor, got shape {tuple(t.shape)}", source=source, key=key)
    if not t.is_floating_point():
        raise CorruptFileError(f"LoRA factor has non-float dtype {t.dtype}", source=source, key=key)
    if not t.is_meta and not _finite(t):
        raise NonFiniteError("LoRA factor contains NaN or Inf", source=source, key=key)
    return t


def _alpha(t: torch.Tensor, source: str, key: str) -> float:
    if t.numel() != 1:
        raise ShapeMismatchError(f"alpha must be a scalar, got shape {tuple(t.shape)}", source=source, key=key)
    value = float(t.reshape(()).item())
    if not (value == value) or value in (float("inf"), float("-inf")):
        raise NonFiniteError("alpha is NaN or Inf", source=source, key=key)
    return value
