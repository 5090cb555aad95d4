"""What a LoRA file holds and what of it binds to a model, from its header alone.

``header_adapter(path)`` builds an :class:`Adapter` whose factors are ``meta`` tensors of
the header's shapes and dtypes: the layout is classified by the same rules as a real load
(``keymap.classify``), only the scalar ``alpha`` tensors are read. Binding it with
``compose.plan`` against a model built on the meta device (every module there, no weight
allocated) runs the very checks a real apply would, so a file can be checked against a
20B model in seconds and a few hundred MB. ``summary`` and ``bind_report`` turn the result
into plain data for ``farm lora inspect`` and ``farm validate --deep``.
"""
from __future__ import annotations

import os
from types import MappingProxyType
from typing import Any

import torch

from .adapter import Adapter, LoraLayer, classify_keys, converted_layers
from .compose import plan
from .errors import CorruptFileError, LoraError, ShapeMismatchError
from .formats import nunchaku_converted
from .model_index import ModelIndex
from .safetensors_io import (file_sha256, is_pickle_file, load_pickle_state_dict, load_tensors, read_header,
                             read_metadata)

#: safetensors dtype names -> torch dtypes (every one ``safetensors_io`` reads).
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
                      "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
_TORCH_DTYPES = {name: dtype for name, dtype in SAFETENSORS_DTYPES.items() if dtype.is_floating_point}
#: Header metadata shown by ``summary`` (the trainers' own notes: information, not truth).
SHOWN_METADATA = ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_base_model_version",
                  "modelspec.architecture", "format")


def _meta(path: str, key: str, info: dict) -> torch.Tensor:
    shape = list(info["shape"])
    if len(shape) == 4 and shape[2:] == [1, 1]:
        shape = shape[:2]  # 1x1 conv LoRAs are linear maps (as adapter._matrix reads them)
    dtype = _TORCH_DTYPES.get(info["dtype"])
    if len(shape) != 2:
        raise ShapeMismatchError(f"expected a 2-D LoRA factor, got shape {tuple(info['shape'])}", source=path, key=key)
    if dtype is None:
        raise CorruptFileError(f"LoRA factor has non-float dtype {info['dtype']}", source=path, key=key)
    return torch.empty(shape, dtype=dtype, device="meta")


def header_adapter(path: str, *, content_id: str | None = None, name: str | None = None) -> Adapter:
    """The file's layers with ``meta`` factors (no tensor data read but the alphas).

    Raises what a real load raises for the header and the layout (``CorruptFileError``,
    ``UnknownKeysError``, ``UnsupportedFormatError``, ``ShapeMismatchError`` ...); the
    values of the factors (NaN, Inf) are not checked: only a real load reads them. ``name``: what
    errors and the adapter call the file (the URI a cache blob was fetched for), as in
    ``lora_core.adapter.load_adapter_file``."""
    path = os.fspath(path)
    src = name or path
    if not os.path.isfile(path):
        raise CorruptFileError("no such LoRA file", source=src)
    if is_pickle_file(path):
        load_pickle_state_dict(path, allow_pickle=False, name=src)  # refused, as the workers refuse it (UnsafeFormatError)
    header = read_header(path, src)
    keymap, diff_keys = classify_keys(header.keys(), src)  # .diff/.diff_b split off (lora_core.diffs)
    alpha_keys = [roles["alpha"] for roles in keymap.entries.values() if "alpha" in roles]
    alphas = load_tensors(path, alpha_keys, src) if alpha_keys else {}
    layers: dict[str, LoraLayer] = {}
    if keymap.scheme in nunchaku_converted.NAMES:  # packed factors: their unpacked shapes, scale 1
        metas = {k: _meta(src, k, header[k]) for roles in keymap.entries.values() for k in roles.values()}
        layers = converted_layers(keymap.entries, metas, src)
    for target, roles in ({} if layers else keymap.entries).items():
        if "A" not in roles or "B" not in roles:
            continue  # a role other than a low-rank pair (a full-weight diff): not bound here
        a, b = _meta(src, roles["A"], header[roles["A"]]), _meta(src, roles["B"], header[roles["B"]])
        if a.shape[0] != b.shape[1]:
            raise ShapeMismatchError(f"down has rank {a.shape[0]} but up has rank {b.shape[1]}",
                                     source=src, key=roles["B"])
        alpha = float(a.shape[0])
        if "alpha" in roles:
            t = alphas[roles["alpha"]]
            if t.numel() != 1:
                raise ShapeMismatchError(f"alpha must be a scalar, got shape {tuple(t.shape)}", source=src,
                                         key=roles["alpha"])
            alpha = float(t.reshape(()).item())
        layers[target] = LoraLayer(A=a, B=b, alpha=alpha)
    found = {t: {p: _meta_diff(src, k, header[k]) for p, k in ps.items()} for t, ps in diff_keys.items()}
    names = {(t, p): k for t, ps in diff_keys.items() for p, k in ps.items()}
    return Adapter(layers=MappingProxyType(layers), content_id=content_id or file_sha256(path), source=src,
                   scheme=keymap.scheme, metadata=read_metadata(path, src), diffs=MappingProxyType(found),
                   diff_keys=MappingProxyType(names))


def _meta_diff(path: str, key: str, info: dict) -> torch.Tensor:
    dtype = _TORCH_DTYPES.get(info["dtype"])
    if dtype is None:
        raise CorruptFileError(f"full-weight diff has non-float dtype {info['dtype']}", source=path, key=key)
    return torch.empty(list(info["shape"]), dtype=dtype, device="meta")


def summary(path: str, adapter: Adapter | None = None) -> dict[str, Any]:
    """Layout, ranks, alphas, dtypes, size and targets of a safetensors LoRA file."""
    path = os.fspath(path)
    adapter = adapter or header_adapter(path)
    header = read_header(path)
    dtypes: dict[str, int] = {}
    for info in header.values():
        dtypes[info["dtype"]] = dtypes.get(info["dtype"], 0) + 1
    layers = adapter.layers
    return {
        "file": path,
        "bytes": os.path.getsize(path),
        "sha256": adapter.content_id,
        "layout": adapter.scheme,
        "tensors": len(header),
        "dtypes": dtypes,
        "ranks": sorted({layer.rank for layer in layers.values()}),
        "alphas": sorted({layer.alpha for layer in layers.values()}),
        "metadata": {k: v for k, v in adapter.metadata.items() if k in SHOWN_METADATA},
        "targets": {t: {"rank": l.rank, "alpha": l.alpha, "in": int(l.A.shape[1]), "out": int(l.B.shape[0])}
                    for t, l in sorted(layers.items())},
        "diffs": {t: {p: list(d.shape) for p, d in sorted(ps.items())} for t, ps in sorted(adapter.diffs.items())},
        **({"base_part": any(layer.may_hold_base for layer in layers.values())}
           if adapter.scheme == nunchaku_converted.NAME else {}),
    }


def bind_report(adapter: Adapter, index: ModelIndex) -> dict[str, Any]:
    """Per file target: the model modules it lands on, or why it is refused.

    Each target is planned alone, so every refusal is reported (``plan`` stops at the first
    shape error); on meta factors and a meta model this allocates nothing."""
    bound: dict[str, list[str]] = {}
    refused: dict[str, str] = {}
    parts = [(t, {"layers": MappingProxyType({t: layer})}) for t, layer in sorted(adapter.layers.items())]
    for t, ps in sorted(adapter.diffs.items()):  # a diff target is named by its key (``P.diff``, ``P.diff_b``)
        for p, d in sorted(ps.items()):
            key = adapter.diff_keys.get((t, p), t)
            parts.append((key, {"layers": MappingProxyType({}), "diffs": MappingProxyType({t: {p: d}}),
                                "diff_keys": MappingProxyType({(t, p): key})}))
    for name, fields in parts:
        one = Adapter(content_id=adapter.content_id, source=adapter.source, scheme=adapter.scheme, **fields)
        try:
            bound[name] = sorted(plan([(one, 1.0)], index))
        except LoraError as e:
            refused[name] = f"{type(e).__name__}: {_reason(e)}"
    return {"bound": bound, "refused": refused}


def _reason(e: LoraError) -> str:
    """The message without the file name the error appends (the report names the file once)."""
    text = str(e.args[0]) if e.args else str(e)
    return text.split(" (file ")[0]


#: ``format_summary``'s budget: at most 7 + 7 + 1 + 8 = 23 lines, whatever the file (``--json`` lists all).
MAX_TARGETS_SHOWN = 6
MAX_REASONS_SHOWN = 4
MAX_KEYS_SHOWN = 2
MAX_LINE = 200


def refusal_groups(refused: dict[str, str]) -> list[tuple[str, list[str], str]]:
    """``[(error type, keys, first message)]``, most keys first: the refusals grouped by reason."""
    groups: dict[str, tuple[list[str], str]] = {}
    for key, why in refused.items():
        kind, _, text = why.partition(": ")
        groups.setdefault(kind, ([], text))[0].append(key)
    return sorted(((k, keys, text) for k, (keys, text) in groups.items()), key=lambda g: (-len(g[1]), g[0]))


def _clip(text: str) -> str:
    """One line of at most MAX_LINE printable characters: a file's header is untrusted, and a
    newline or a terminal escape in it must not add lines or reach the terminal."""
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= MAX_LINE else text[: MAX_LINE - 3] + "..."


#: What a layout line adds for a nunchaku-converted file (``summary``'s ``base_part``: ranks may hold a base branch).
_LAYOUT_NOTES = {
    (nunchaku_converted.NAME, True): " (packed; ranks may begin with its base checkpoint's branch, checked on bind)",
    (nunchaku_converted.NAME, False): " (packed; converted without a base: an ordinary LoRA)",
    (nunchaku_converted.nunchaku_flux.NAME, None): (" (packed; each W4A4 layer's first 32 ranks, its base "
                                                    "checkpoint's branch, dropped)"),
}


def format_summary(info: dict[str, Any], binding: dict[str, Any] | None = None) -> str:
    """One screen of text (at most 23 lines): the summary, the first targets, and with a model
    the refusals grouped by reason, each with its count, first keys and first message."""
    meta = ", ".join(f"{k}={v}" for k, v in info["metadata"].items()) or "-"
    lines = [
        _clip(f"{info['file']}"),
        f"  layout   {info['layout']}" + _LAYOUT_NOTES.get((info["layout"], info.get("base_part")), ""),
        f"  size     {info['bytes']:,} bytes, {info['tensors']} tensors ("
        + ", ".join(f"{n} {d}" for d, n in sorted(info["dtypes"].items())) + ")",
        f"  rank(s)  {', '.join(map(str, info['ranks'])) or '-'}",
        f"  alpha(s) {', '.join(f'{a:g}' for a in info['alphas']) or '-'}",
        _clip(f"  metadata {meta}"),
        f"  targets  {len(info['targets'])}" + (f" low-rank, {len(info['diffs'])} full-weight diff(s)"
                                                 if info["diffs"] else "") + ":",
    ]
    targets = list(info["targets"].items())
    for t, d in targets[:MAX_TARGETS_SHOWN]:
        lines.append(_clip(f"    {t}  r={d['rank']} alpha={d['alpha']:g} {d['in']}->{d['out']}"))
    if len(targets) > MAX_TARGETS_SHOWN:
        lines.append(f"    ... ({len(targets) - MAX_TARGETS_SHOWN} more; --json lists all)")
    if binding is not None:
        lines.append(f"  binds    {len(binding['bound'])} target(s), {len(binding['refused'])} refused")
        groups = refusal_groups(binding["refused"])
        shown = groups if len(groups) <= MAX_REASONS_SHOWN else groups[: MAX_REASONS_SHOWN - 1]
        for kind, keys, text in shown:
            more = f" +{len(keys) - MAX_KEYS_SHOWN} more" if len(keys) > MAX_KEYS_SHOWN else ""
            lines.append(_clip(f"    refused {len(keys)} {kind}: {', '.join(keys[:MAX_KEYS_SHOWN])}{more}"))
            lines.append(_clip(f"      e.g. {keys[0]}: {text}"))
        if len(shown) < len(groups):
            rest = groups[len(shown):]
            lines.append(f"    ... ({sum(len(g[1]) for g in rest)} more refused for {len(rest)} other reason(s): "
                         + ", ".join(g[0] for g in rest)[:120] + "; --json lists all)")
    return "\n".join(lines)
