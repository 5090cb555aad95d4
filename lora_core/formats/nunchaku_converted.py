"""nunchaku's own converted LoRA files (``to_nunchaku`` output): what the converters write, and how we read them.

Facts, from the tools' public code (read, not copied):

- nunchaku-tech/nunchaku, main (3a3cc3d), ``nunchaku/lora/flux/nunchaku_converter.py`` ``to_nunchaku(lora,
  base_sd)``, ``diffusers_converter.py``, ``models/transformers/transformer_flux.py``, ``csrc/flux.h``: the LoRA
  is first put in diffusers names, a kohya ``.alpha`` folded into ``lora_A`` (A·alpha/rank). For every block of
  the *base checkpoint* (the base is required: blocks are listed from its keys) and each of nunchaku's internal
  Flux modules (``qkv_proj``, ``qkv_proj_context``, ``out_proj``, ``out_proj_context``, ``mlp_fc1``, ``mlp_fc2``,
  ``mlp_context_fc1``, ``mlp_context_fc2``, ``norm1.linear``, ``norm1_context.linear``, ``norm.linear``) it writes
  bare ``{block}.{module}.lora_down`` / ``.lora_up`` (no ``.weight``): the checkpoint's own low-rank branch first,
  the LoRA after it along the rank (q/k/v fused: one shared down, ups stacked; else downs stacked, ups
  block-diagonal), packed again for the W4A4 kernel (both sides zero-padded to 16, ``lora_core/nunchaku.py``'s
  permutation); a module the LoRA leaves alone gets the base branch alone. Modulation (``norm*.linear``, AWQ,
  no base branch): down rank-padded, up rows interleaved (row j·splits+s) and rank-padded, not packed. bf16 by
  default; no header metadata; non-block LoRA keys stay diffusers-style (``x_embedder.lora_A.weight``).
  ``update_lora_params`` replaces each layer's branch wholesale and ``set_lora_strength(s)`` calls
  ``setLoraScale(SVD_RANK=32, s)``: a W4A4 layer keeps scale 1 on its first 32 ranks and gives s to every later
  16-rank group (AWQ layers: s on their whole branch). ComfyUI-nunchaku (``wrappers/flux.py`` ->
  ``compose_lora``) passes one converted file through unscaled when ``strength - 1 < 1e-5`` and asserts otherwise.
- Qwen-Image: nunchaku's main has no converter for it. An unmerged branch of nunchaku-tech/nunchaku (commit
  061b23f, "feat: add LoRA support for attention and transformer models": ``nunchaku/lora/qwenimage/
  nunchaku_converter.py``, ``models/linear.py``, ``models/transformers/transformer_qwenimage.py``) writes the
  model's own names, ``transformer_blocks.N.{attn.to_qkv, attn.add_qkv_proj, attn.to_out.0, attn.to_add_out,
  img_mlp.net.0.proj, img_mlp.net.2, txt_mlp.net.0.proj, txt_mlp.net.2, img_mod.1, txt_mod.1}.lora_down/_up``,
  for the blocks the LoRA touches. Given a base (``quant_path`` / ``base_sd``) each SVDQ layer's own packed
  ``proj_down``/``proj_up`` is unpacked and put FIRST, the LoRA after it, packed again; layers the LoRA leaves
  alone get the base alone, so every touched block has all eight SVDQ layers. Without one (its documented
  ``to_nunchaku("lora.safetensors", output_path=...)``) only the LoRA's layers, the LoRA alone. ``img_mod.1`` /
  ``txt_mod.1`` (AWQ) as Flux's modulation (6 splits). bf16, no metadata; the converter itself reads no
  ``.alpha`` (its ``compose_lora`` folds alpha/rank into A, and multiplies by 2·strength, an "empirical
  amplification" we do not reproduce). Its loader swaps ``proj_down``/``proj_up`` in wholesale and
  ``set_lora_strength`` scales the ranks past the model's own rank (those keep 1).
- ussoewwin/ComfyUI-QwenImageLoraLoader (what ComfyUI-nunchaku users load Qwen-Image LoRAs with) does not read
  these files: it concatenates original LoRAs onto the branch itself, as lora_core does.

What lora_core does with them:

- Flux names (scheme ``nunchaku-converted-flux``): loaded onto diffusers' Flux modules by
  :mod:`.nunchaku_flux` (its docstring has the Flux converter's facts and their sources): nunchaku's loader
  keeps the first ``SVD_RANK`` = 32 ranks of every W4A4 layer at scale 1 (they are the base checkpoint's
  branch, which the Flux converter always puts first), so those are dropped and the rest is the LoRA.
- Qwen-Image names: loaded. Packed factors are unpacked (exact: a permutation), modulation ups put back in
  diffusers' chunk-major rows (``compose`` interleaves them again on nunchaku's layers), scale 1 (what the file
  holds is the update; strength scales it). Factors are 2-D floats of 16 bits or more (the converter writes
  bf16 or fp16: its packer takes no other). The file is *base-free* (all its factors are the LoRA's) when one
  of two things proves it (:func:`base_free`): a block it touches lacks one of the eight SVDQ layers (a
  converter given a base writes them all), or an SVDQ layer has fewer than :data:`MIN_BASE_RANK` = 32 ranks,
  padding included (given a base it puts the base's ranks first, and nunchaku's checkpoints have 32 or 128:
  ``svdq-*_r32-*`` / ``_r128``); a base-free file is an ordinary LoRA on any model. Otherwise its SVDQ factors
  may begin with a base branch, and :func:`bind` decides against the model: on an SVDQ layer the leading ranks
  (as many as the layer's own packed branch has) must equal that branch bit for bit (in the file's dtype); they
  are dropped, the rest lands like any LoRA (concatenated after the model's own branch, times the strength:
  what ``set_lora_strength`` does); a layer whose file branch is the base alone adds nothing; a file with fewer
  ranks than the layer's own, or other leading ranks, is an error naming the key. On a dense layer such a
  factor is refused (no branch to check it against). What stays ambiguous, and is refused: a file converted
  *without* a base from a LoRA that trains all eight SVDQ layers of every block it touches with rank >= 32
  (after q/k/v fusion and padding) reads exactly as one converted against some checkpoint. Refused on a dense
  model; on nunchaku's model, refused unless its leading ranks are that model's own; and on an r128 model a
  file of ranks 32..127 may also have been converted against an r32 checkpoint, so rank alone proves nothing
  there either. A header-only bind (meta tensors) checks shapes only: a file converted against another
  checkpoint of the same rank passes it and is refused at the real load.
"""
from __future__ import annotations

import dataclasses
import re
from types import MappingProxyType
from typing import Any, Iterable, Mapping

import torch

from ..errors import ShapeMismatchError, UnknownKeysError, UnsupportedFormatError
from ..nunchaku import TILE, base_of, chunk_major_modulation_rows, unpack_lowrank
from ..resolve import Unresolved, resolve
from . import nunchaku_flux
from .nunchaku_common import crop as _crop, message, meta as _meta

NAME = "nunchaku-converted"

# nunchaku's internal Flux module leaves, as its Flux converter's local_name_map writes them
_LEAF = re.compile(r"(?:^|\.)(?:qkv_proj(?:_context)?|out_proj(?:_context)?|mlp(?:_context)?_fc[12])\.lora_(?:down|up)$")
# any bare factor: what no scheme reads (``.lora_down.weight`` is kohya's)
_BARE = re.compile(r"(?:^|\.)lora_(?:down|up)$")
_PAIR = re.compile(r"^(?P<target>.+)\.lora_(?P<role>down|up)$")
_BLOCK = re.compile(r"^(?P<block>transformer_blocks\.\d+)\.(?P<leaf>.+)$")
#: the Qwen-Image converter's packed SVDQ layers (each with a base branch in nunchaku's checkpoints)
SVDQ_LEAVES = ("attn.to_qkv", "attn.add_qkv_proj", "attn.to_out.0", "attn.to_add_out",
               "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2")
#: its modulation layers (AWQ, no base branch): not packed, up rows interleaved
MODULATION_LEAVES = ("img_mod.1", "txt_mod.1")
#: the smallest low-rank branch nunchaku's SVDQ checkpoints have (Qwen-Image: r32 and r128): a file converted
#: against one has at least this many ranks on every SVDQ layer
MIN_BASE_RANK = 32
#: what no file tells apart from one converted against a checkpoint (see the module's docstring)
AMBIGUOUS = (f"a file converted without a base from a LoRA that trains all eight SVDQ layers of every block it "
             f"touches with rank >= {MIN_BASE_RANK} reads the same")


def detect(keys: Iterable[str]) -> str | None:
    """The key that marks a nunchaku-converted file (the first on one of nunchaku's own Flux
    leaves, else the first bare ``lora_down``/``lora_up``), or None."""
    bare = [key for key in keys if _BARE.search(key)]
    return next((key for key in bare if _LEAF.search(key)), bare[0] if bare else None)


def classify(keys: Iterable[str]) -> tuple[str, dict[str, dict[str, str]]]:
    """``(scheme, entries)`` of a file :func:`detect` marked: its Flux layout (a key on one of
    nunchaku's own Flux modules: :mod:`.nunchaku_flux`) or the Qwen-Image one (:func:`entries`)."""
    keys = sorted(keys)
    marker = detect(keys)
    if marker is not None and _LEAF.search(marker):
        return nunchaku_flux.NAME, nunchaku_flux.entries(keys)
    return NAME, entries(keys)


def entries(keys: Iterable[str]) -> dict[str, dict[str, str]]:
    """``{target: {"A": down key, "B": up key}}`` of the Qwen-Image converter's layout; refused by
    name where it is not that (other keys beside, unknown layers)."""
    keys = sorted(keys)
    marker = detect(keys)
    other = [k for k in keys if not _BARE.search(k)]
    if other:
        raise UnsupportedFormatError(message(marker, f"bare nunchaku factors mixed with {len(other)} other key(s) "
                                                     f"(first {other[0]!r}), which its converter never writes"))
    out: dict[str, dict[str, str]] = {}
    for key in keys:
        m = _PAIR.match(key)
        block = _BLOCK.match(m.group("target")) if m else None
        if block is None or block.group("leaf") not in SVDQ_LEAVES + MODULATION_LEAVES:
            raise UnsupportedFormatError(message(key, "not a layer nunchaku's Qwen-Image converter writes "
                                                      f"({', '.join(SVDQ_LEAVES + MODULATION_LEAVES)})"))
        out.setdefault(m.group("target"), {})["A" if m.group("role") == "down" else "B"] = key
    lonely = sorted(k for roles in out.values() if len(roles) != 2 for k in roles.values())
    if lonely:
        raise UnknownKeysError(lonely, reason="have no matching lora_down/lora_up partner")
    return out


def base_free(targets: Iterable[str], svdq_ranks: Mapping[str, int]) -> bool:
    """True when the file provably holds no base branch: some block it touches lacks one of the
    eight SVDQ layers (a converter given a base writes them all), or an SVDQ layer has fewer than
    :data:`MIN_BASE_RANK` ranks, padding included (one given a base puts the base's ranks first).
    ``svdq_ranks``: ``{target: rank}`` of the file's SVDQ layers. False says only "may hold a base"."""
    blocks: dict[str, set[str]] = {}
    for t in targets:
        m = _BLOCK.match(t)
        if m:
            blocks.setdefault(m.group("block"), set()).add(m.group("leaf"))
    return (any(not set(SVDQ_LEAVES) <= leaves for leaves in blocks.values())
            or any(rank < MIN_BASE_RANK for rank in svdq_ranks.values()))


def factors(entries: Mapping[str, Mapping[str, str]], tensors: Mapping[str, torch.Tensor], source: str
            ) -> dict[str, tuple[torch.Tensor, torch.Tensor, bool]]:
    """``{target: (A (rank, in), B (out, rank), may_hold_base)}``: packed factors unpacked, the
    modulation ups in diffusers' chunk-major rows. ``tensors``: the file's factors, already checked
    2-D floats (``adapter.converted_layers``); meta tensors (a header) get their shapes only.
    A Flux-layout file's entries go to :func:`.nunchaku_flux.factors`."""
    if any(_LEAF.search(k) for roles in entries.values() for k in roles.values()):
        return nunchaku_flux.factors(entries, tensors, source)
    out, ranks = {}, {}
    for target, roles in entries.items():
        down, up = tensors[roles["A"]], tensors[roles["B"]]
        for role, t in (("A", down), ("B", up)):
            if t.element_size() < 2:
                raise UnsupportedFormatError(message(roles[role], (
                    f"a {t.dtype} factor, which nunchaku's converter never writes (bf16 or fp16: its packer "
                    "takes no other)")), source=source)
        packed = _BLOCK.match(target).group("leaf") in SVDQ_LEAVES
        if packed:
            for role, t in (("A", down), ("B", up)):
                if t.shape[0] % TILE or t.shape[1] % TILE:
                    raise ShapeMismatchError(f"a packed factor's sides are multiples of {TILE}, got "
                                             f"{tuple(t.shape)}", source=source, key=roles[role])
        rank_d, rank_u = (down.shape[1], up.shape[1]) if packed else (down.shape[0], up.shape[1])
        if rank_d != rank_u:
            raise ShapeMismatchError(f"lora_down has rank {rank_d} but its lora_up {roles['B']!r} has rank "
                                     f"{rank_u}", source=source, key=roles["A"])
        if packed:
            ranks[target] = rank_d
            a = _meta(down.shape[::-1], down) if down.is_meta else unpack_lowrank(down, down=True)
            b = _meta(up.shape, up) if up.is_meta else unpack_lowrank(up, down=False)
        else:
            if up.shape[0] % 6:
                raise ShapeMismatchError(f"a modulation up has 6 chunks of rows, got {up.shape[0]} rows",
                                         source=source, key=roles["B"])
            a, b = down, (_meta(up.shape, up) if up.is_meta else chunk_major_modulation_rows(up))
        out[target] = (a, b, packed)
    free = base_free(entries, ranks)
    return {t: (a, b, packed and not free) for t, (a, b, packed) in out.items()}


def bind(adapter: Any, index: Any) -> Any:
    """``adapter`` as an ordinary LoRA for the model ``index`` indexes: base parts checked
    and dropped on SVDQ layers, padding cropped to the modules' sizes; any other adapter as it is.

    A factor that may hold a base part on a layer without a branch of its own (a dense one)
    is refused; one whose leading ranks are not the SVDQ layer's own branch too. A target the
    model does not have is kept as it is: ``compose.plan`` lists it with the others."""
    if getattr(adapter, "scheme", None) == nunchaku_flux.NAME:
        return nunchaku_flux.bind(adapter, index)
    if getattr(adapter, "scheme", None) != NAME:
        return adapter
    layers = {}
    for target, layer in adapter.layers.items():
        keys = (f"{target}.lora_down", f"{target}.lora_up")  # the file's own keys (bare, as the converter writes)
        try:
            places = resolve(target, index)
        except Unresolved:
            layers[target] = layer
            continue
        a, b = layer.A, layer.B
        if layer.may_hold_base:
            module = index.modules[places[0].module]
            if len(places) != 1 or index.kinds[places[0].module] != "svdq":
                where = ", ".join(sorted({p.module for p in places}))
                raise UnsupportedFormatError(message(keys[0], (
                    "every block this file touches has all eight of nunchaku's SVDQ layers, none with fewer than "
                    f"{MIN_BASE_RANK} ranks, as its converter writes them when given the base checkpoint: their "
                    f"leading ranks may then be that checkpoint's own SVD branch, which {where} (not an SVDQ layer) "
                    f"does not have, and nothing in the file tells them from the LoRA's ({AMBIGUOUS})"),
                    "load it on the nunchaku model it was converted against, or use the original LoRA file"),
                    source=adapter.source)
            a, b = _drop_base(a, b, module, keys, adapter.source)
            if a is None:
                continue  # the base branch alone: a layer the LoRA does not touch
        a, b = _crop(a, b, places, index, keys, adapter.source)
        layers[target] = dataclasses.replace(layer, A=a, B=b, alpha=float(a.shape[0]), may_hold_base=False)
    return dataclasses.replace(adapter, layers=MappingProxyType(layers))


def _drop_base(a: torch.Tensor, b: torch.Tensor, module, keys: tuple[str, str], source: str):
    """(A, B) past the module's own packed branch, which must lead them; (None, None) when nothing
    is past it. ``keys``: the file's (lora_down, lora_up), the one that disagrees named."""
    base_down, base_up, _ = base_of(module)
    r0 = int(base_down.shape[1])
    other = ("this file was not converted against this checkpoint: against another one (nunchaku's have "
             f"r{MIN_BASE_RANK} and r128), or without a base ({AMBIGUOUS})")
    down_fits = a.shape[0] >= r0 and a.shape[1] == base_down.shape[0]
    if not (down_fits and b.shape[0] == base_up.shape[0]):
        raise UnsupportedFormatError(message(keys[0 if not down_fits else 1], (
            f"its branch (rank {a.shape[0]}, {a.shape[1]} in, {b.shape[0]} out, padded) cannot begin with this "
            f"layer's own (rank {r0}, {base_down.shape[0]} in, {base_up.shape[0]} out): {other}")), source=source)
    if not (a.is_meta or base_down.is_meta):
        own_a = unpack_lowrank(base_down.data, down=True).to(device=a.device, dtype=a.dtype)
        own_b = unpack_lowrank(base_up.data, down=False).to(device=b.device, dtype=b.dtype)
        for key, ok in ((keys[0], torch.equal(a[:r0], own_a)), (keys[1], torch.equal(b[:, :r0], own_b))):
            if not ok:
                raise UnsupportedFormatError(message(key, (
                    f"its first {r0} ranks are not this layer's own low-rank branch: {other}")), source=source)
    a, b = a[r0:], b[:, r0:]
    if a.shape[0] == 0 or not (a.is_meta or bool(a.any() and b.any())):
        return None, None
    return a, b


#: both layouts' scheme names (an adapter of either is built by ``adapter.converted_layers``)
NAMES = (NAME, nunchaku_flux.NAME)
