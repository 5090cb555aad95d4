"""nunchaku's converted Flux LoRA files (``to_nunchaku`` output, its Flux layout), read onto diffusers' Flux.

Facts, from nunchaku-tech/nunchaku main (3a3cc3d), read, not copied:

- ``nunchaku/lora/flux/nunchaku_converter.py`` ``to_nunchaku(input_lora, base_sd)``: the LoRA is first put in
  diffusers names by ``diffusers_converter.py`` ``to_diffusers`` (a kohya ``.alpha`` folded into ``lora_A``:
  ``A * alpha / rank``). ``convert_to_nunchaku_flux_lowrank_dict`` lists the blocks from the *base checkpoint's*
  keys (the base is required) and, per block, maps each of nunchaku's module names to diffusers' with a
  ``local_name_map``: double blocks (``transformer_blocks.N``) ``qkv_proj`` <- ``attn.to_q/k/v``,
  ``qkv_proj_context`` <- ``attn.add_q/k/v_proj``, ``out_proj`` <- ``attn.to_out.0``, ``out_proj_context`` <-
  ``attn.to_add_out``, ``mlp_fc1`` <- ``ff.net.0.proj``, ``mlp_fc2`` <- ``ff.net.2``, ``mlp_context_fc1/2`` <-
  ``ff_context.net.0.proj`` / ``ff_context.net.2``, ``norm1.linear`` / ``norm1_context.linear`` (``adanorm_zero``,
  6 splits); single blocks (``single_transformer_blocks.N``) ``qkv_proj`` <- ``attn.to_q/k/v``, ``mlp_fc1`` <-
  ``proj_mlp``, ``out_proj`` <- ``proj_out.linears.0``, ``mlp_fc2`` <- ``proj_out.linears.1``, ``norm.linear``
  (``adanorm_single``, 3 splits). The single block's diffusers ``proj_out`` is split first
  (``convert_to_nunchaku_flux_single_transformer_block_lowrank_dict``): down columns ``[:n1]`` (n1 = out_proj's
  input width, the attention output) to ``linears.0``, ``[n1:]`` to ``linears.1``, the up copied to both; the
  C++ block (``src/FluxModel.cpp`` ``FluxSingleTransformerBlock::forward``) adds ``out_proj(attn)`` and
  ``mlp_fc2(gelu(mlp_fc1(x)))``, so the two halves are proj_out's column halves. q/k/v: one shared down keeps it
  and stacks the ups (q, k, v rows in that order), else downs stacked and ups block-diagonal; a missing part gets
  the first part's down and a zero up. fc1/fc2 ranks are zero-padded to the larger of the two.
- Per W4A4 layer (``convert_map`` "linear"): the base checkpoint's own ``lora_down``/``lora_up`` unpacked
  (``unpack_lowrank_weight``) and put FIRST, the LoRA after it along the rank (``torch.cat``, in the base's
  dtype), packed again (``pack_lowrank_weight``: zero-padded to 16 on both sides, ``lora_core/nunchaku.py``'s
  permutation); a layer the LoRA leaves alone gets the base alone. Modulation (AWQ, no base branch): down
  rank-padded to 16, up rows interleaved (``reorder_adanorm_lora_up``: row ``j*splits + s``) and rank-padded,
  not packed. Written as bare ``{block}.{name}.lora_down`` / ``.lora_up``, bf16 by default (fp16 on request),
  no header metadata. Keys outside the blocks stay as ``to_diffusers`` wrote them (``x_embedder.lora_A.weight``,
  the input dtype); 1-D ``lora_B.bias`` vectors become ``.bias`` keys (fused into the quantized biases by
  ``fuse_vectors``).
- The loader (``models/transformers/transformer_flux.py``): ``update_lora_params`` swaps each layer's branch
  in wholesale; ``set_lora_strength(s)`` calls ``setLoraScale(SVD_RANK = 32, s)`` (``nunchaku/csrc/flux.h``):
  a W4A4 layer keeps scale 1 on its first 32 ranks and gives ``s`` to every later 16-rank group, an AWQ layer
  ``s`` on its whole branch; the keys outside the blocks are merged as ``s * B @ A``.

What lora_core does with them (on diffusers' Flux, or any model with those modules):

- On every W4A4 layer the first :data:`SVD_RANK` ranks (the base checkpoint's branch) are dropped and the
  rest is the LoRA, scale 1 (alpha is folded in; the strength scales it): what nunchaku's loader gives a file.
  A layer with exactly 32 ranks (or nothing but zeros past them) is the base alone and adds nothing. Fewer
  than 32 is an error naming the key, as is a file with no rank past 32 anywhere (it holds no LoRA): the
  converter writes a layer of the LoRA alone only against a checkpoint without a branch there (its
  ``orig_lora`` is then None), and nunchaku's loader keeps such a LoRA's own first 32 ranks at scale 1
  whatever the strength, which no strength here reproduces (a LoRA-alone layer of exactly 32 ranks cannot
  be told from the base alone, and is read as it). Modulation ups are put back in diffusers' chunk-major
  rows, scale 1.
- ``qkv_proj`` binds as ``attn.to_qkv`` (``add_qkv_proj`` for the context one): split by rows onto
  ``to_q/to_k/to_v`` by the model's widths, each part with the whole (shared) down, so its rank as its own.
  A single block's ``out_proj`` / ``mlp_fc2`` bind as ``proj_out.linears.0/1`` where the model splits
  ``proj_out``; on diffusers' one ``proj_out`` they become one layer (downs block-diagonal over its input
  columns, the attention's first, ups side by side), n1 read from the model (``proj_out``'s input minus
  ``proj_mlp``'s output). Keys outside the blocks are ordinary LoRA layers, scale 1. ``.bias`` vectors are
  refused by name, and with them the file.
"""
from __future__ import annotations

import dataclasses
import re
from types import MappingProxyType
from typing import Any, Iterable, Mapping

import torch

from ..errors import ShapeMismatchError, UnknownKeysError, UnsupportedFormatError
from ..nunchaku import TILE, chunk_major_modulation_rows, unpack_lowrank
from ..resolve import Unresolved, resolve
from .nunchaku_common import crop as _crop, message, meta as _meta

NAME = "nunchaku-converted-flux"
#: nunchaku's Flux loader: ranks it leaves at scale 1 on every W4A4 layer (the base checkpoint's branch)
SVD_RANK = 32
#: nunchaku's W4A4 module names -> the diffusers (or fused) target they bind as, per block kind
W4A4 = {
    "transformer_blocks": {"qkv_proj": "attn.to_qkv", "qkv_proj_context": "attn.add_qkv_proj",
                           "out_proj": "attn.to_out.0", "out_proj_context": "attn.to_add_out",
                           "mlp_fc1": "ff.net.0.proj", "mlp_fc2": "ff.net.2",
                           "mlp_context_fc1": "ff_context.net.0.proj", "mlp_context_fc2": "ff_context.net.2"},
    "single_transformer_blocks": {"qkv_proj": "attn.to_qkv", "mlp_fc1": "proj_mlp",
                                  "out_proj": "proj_out.linears.0", "mlp_fc2": "proj_out.linears.1"},
}
#: its modulation (AWQ) names, the same in both naming schemes, and their splits
MODULATION = {"transformer_blocks": {"norm1.linear": 6, "norm1_context.linear": 6},
              "single_transformer_blocks": {"norm.linear": 3}}


def _message(key: str, why: str) -> str:
    return message(key, why, "use the original LoRA file")


_BARE = re.compile(r"^(?P<kind>(?:single_)?transformer_blocks)\.(?P<n>\d+)\.(?P<leaf>.+)\.lora_(?P<role>down|up)$")
_PEFT = re.compile(r"^(?P<target>.+)\.lora_(?P<role>A|B)\.weight$")
_HALF = re.compile(r"^(?P<block>single_transformer_blocks\.\d+)\.proj_out\.linears\.(?P<i>[01])$")
_BLOCK = re.compile(r"^(?P<kind>(?:single_)?transformer_blocks)\.(?P<n>\d+)\.(?P<rest>.+)$")
_REVERSE = {kind: {t: leaf for leaf, t in m.items()} for kind, m in W4A4.items()}


def entries(keys: Iterable[str]) -> dict[str, dict[str, str]]:
    """``{file target: {"A": key, "B": key}}``; every other key refused by name."""
    out: dict[str, dict[str, str]] = {}
    for key in sorted(keys):
        m = _BARE.match(key)
        if m:
            kind, leaf = m.group("kind"), m.group("leaf")
            if leaf not in W4A4[kind] and leaf not in MODULATION[kind]:
                raise UnsupportedFormatError(_message(key, (
                    f"not a module nunchaku's Flux converter writes in {kind} "
                    f"({', '.join([*W4A4[kind], *MODULATION[kind]])})")))
            out.setdefault(key.rsplit(".", 1)[0], {})["A" if m.group("role") == "down" else "B"] = key
            continue
        p = _PEFT.match(key)
        if p and not _BLOCK.match(p.group("target")):
            out.setdefault(p.group("target"), {})[p.group("role")] = key
            continue
        why = ("a LoRA bias vector, which nunchaku fuses into its quantized biases (fuse_vectors): lora_core reads "
               "no LoRA biases" if key.endswith(".bias") else "not a key nunchaku's Flux converter writes")
        raise UnsupportedFormatError(_message(key, why))
    lonely = sorted(k for roles in out.values() if len(roles) != 2 for k in roles.values())
    if lonely:
        raise UnknownKeysError(lonely, reason="have no matching down/up partner")
    return out


def file_keys(target: str) -> tuple[str, str]:
    """The file's (down, up) keys of a target :func:`factors` returns (to name them in errors)."""
    m = _BLOCK.match(target)
    if m is None:
        return f"{target}.lora_A.weight", f"{target}.lora_B.weight"
    name = f"{m.group('kind')}.{m.group('n')}.{_REVERSE[m.group('kind')].get(m.group('rest'), m.group('rest'))}"
    return f"{name}.lora_down", f"{name}.lora_up"


def factors(entries: Mapping[str, Mapping[str, str]], tensors: Mapping[str, torch.Tensor], source: str
            ) -> dict[str, tuple[torch.Tensor, torch.Tensor, bool]]:
    """``{target: (A (rank, in), B (out, rank), False)}``: W4A4 factors unpacked and their first
    :data:`SVD_RANK` ranks dropped, modulation ups in diffusers' rows, the rest as stored."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor, bool]] = {}
    w4a4_keys: list[str] = []
    for name, roles in sorted(entries.items()):
        down, up = tensors[roles["A"]], tensors[roles["B"]]
        m = _BARE.match(roles["A"])
        if m is None:  # outside the blocks: an ordinary LoRA layer (alpha folded in)
            if down.shape[0] != up.shape[1]:
                raise ShapeMismatchError(f"lora_A has rank {down.shape[0]} but its lora_B {roles['B']!r} has rank "
                                         f"{up.shape[1]}", source=source, key=roles["A"])
            out[name] = (down, up, False)
            continue
        for role, t in (("A", down), ("B", up)):
            if t.element_size() != 2:
                raise UnsupportedFormatError(_message(roles[role], (
                    f"a {t.dtype} factor, which nunchaku's Flux converter never writes (bf16 or fp16)")), source=source)
        kind, block = m.group("kind"), f"{m.group('kind')}.{m.group('n')}"
        leaf = m.group("leaf")
        if leaf in MODULATION[kind]:
            splits = MODULATION[kind][leaf]
            if down.shape[0] != up.shape[1] or up.shape[0] % splits:
                raise ShapeMismatchError(f"a modulation factor pair is (rank, in) / ({splits} chunks of rows, rank), "
                                         f"got {tuple(down.shape)} / {tuple(up.shape)}", source=source, key=roles["B"])
            b = _meta(up.shape, up) if up.is_meta else chunk_major_modulation_rows(up, splits)
            out[name] = (down, b, False)
            continue
        w4a4_keys.append(roles["A"])
        for role, t in (("A", down), ("B", up)):
            if t.shape[0] % TILE or t.shape[1] % TILE:
                raise ShapeMismatchError(f"a packed factor's sides are multiples of {TILE}, got {tuple(t.shape)}",
                                         source=source, key=roles[role])
        if down.shape[1] != up.shape[1]:
            raise ShapeMismatchError(f"lora_down has rank {down.shape[1]} but its lora_up {roles['B']!r} has rank "
                                     f"{up.shape[1]}", source=source, key=roles["A"])
        if down.shape[1] < SVD_RANK:
            raise UnsupportedFormatError(_message(roles["A"], (
                f"rank {down.shape[1]}, below the {SVD_RANK} ranks of the base checkpoint's branch nunchaku's Flux "
                "converter puts first, and its loader keeps the first 32 ranks at scale 1 (SVD_RANK) whatever the "
                "strength: converted against a checkpoint without a branch on this layer, or not by that converter")),
                source=source)
        a = _meta(down.shape[::-1], down) if down.is_meta else unpack_lowrank(down, down=True)
        b = _meta(up.shape, up) if up.is_meta else unpack_lowrank(up, down=False)
        a, b = a[SVD_RANK:], b[:, SVD_RANK:]
        if a.shape[0] == 0 or not (a.is_meta or bool(a.any() and b.any())):
            continue  # the base branch alone: a layer the LoRA does not touch
        out[f"{block}.{W4A4[kind][leaf]}"] = (a, b, False)
    if w4a4_keys and not out:
        raise UnsupportedFormatError(_message(w4a4_keys[0], (
            f"no layer has a rank past the first {SVD_RANK} (its base checkpoint's branch, which nunchaku's "
            "loader keeps at scale 1): the file holds no LoRA")), source=source)
    return out


def bind(adapter: Any, index: Any) -> Any:
    """``adapter`` for the model ``index`` indexes: padding cropped to the modules' sizes, a single
    block's ``out_proj`` / ``mlp_fc2`` joined into one ``proj_out`` layer where the model has one."""
    layers, halves = {}, {}
    for target, layer in adapter.layers.items():
        keys = file_keys(target)
        m = _HALF.match(target)
        if m and target not in index.modules and f"{m.group('block')}.proj_out" in index.modules:
            halves.setdefault(m.group("block"), {})[int(m.group("i"))] = (layer, keys)
            continue
        try:
            places = resolve(target, index)
        except Unresolved:
            layers[target] = layer
            continue
        a, b = _crop(layer.A, layer.B, places, index, keys, adapter.source)
        layers[target] = dataclasses.replace(layer, A=a, B=b, alpha=float(a.shape[0]))
    for block, parts in halves.items():
        a, b = _joined(block, parts, index, adapter.source)
        layers[f"{block}.proj_out"] = dataclasses.replace(next(iter(parts.values()))[0], A=a, B=b,
                                                          alpha=float(a.shape[0]))
    return dataclasses.replace(adapter, layers=MappingProxyType(layers))


def _joined(block: str, parts, index, source: str) -> tuple[torch.Tensor, torch.Tensor]:
    """out_proj (``linears.0``) and mlp_fc2 (``linears.1``) as one layer on ``block.proj_out``:
    each down in its columns (the attention output first), the ups side by side."""
    target, mlp = f"{block}.proj_out", f"{block}.proj_mlp"
    if mlp not in index.modules:
        raise UnsupportedFormatError(_message(next(iter(parts.values()))[1][0], (
            f"the model has {target} but no {mlp}, so where out_proj's input columns end cannot be told")),
            source=source)
    n_in, n_out, n2 = index.in_features(target), index.out_features(target), index.out_features(mlp)
    spans = {0: (0, n_in - n2), 1: (n_in - n2, n2)}
    downs, ups = [], []
    for i, (layer, keys) in sorted(parts.items()):
        c0, n = spans[i]
        a, b = layer.A, layer.B
        for t, side, size, key in ((a, 1, n, keys[0]), (b, 0, n_out, keys[1])):
            if t.shape[side] < size:
                raise ShapeMismatchError(f"the factor is {t.shape[side]} wide where {target}'s part has {size}",
                                         source=source, key=key)
            if not t.is_meta and t.narrow(side, size, t.shape[side] - size).any():
                raise ShapeMismatchError(f"the factor is {t.shape[side]} wide where {target}'s part has {size}, "
                                         "and the rest is not zero padding", source=source, key=key)
        full = a.new_zeros(a.shape[0], n_in)
        if not a.is_meta:
            full[:, c0:c0 + n] = a[:, :n]
        downs.append(full)
        ups.append(b[:n_out])
    return torch.cat(downs, 0), torch.cat(ups, 1)
