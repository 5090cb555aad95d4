"""nunchaku's Qwen-Image transformer on the meta device, from its checkpoint's header alone.

``farm validate --deep`` and ``farm lora inspect --model`` bind LoRAs to this tree: every
module nunchaku's loader would build, with its name, its layer kind and the shapes and
dtypes of its tensors, and no weight read or allocated. nunchaku itself is not imported
(it is an optional install), so the layer classes here carry its class names
(``lora_core.model_index`` matches kinds by class name) and its fields as meta tensors.

What a nunchaku Qwen-Image checkpoint is (nunchaku-tech/nunchaku: ``models/linear.py``,
``models/transformers/transformer_qwenimage.py``, ``merge_safetensors.py``): one
``.safetensors`` file holding the state dict of the patched model, keyed by module path
(``transformer_blocks.N.attn.to_qkv.qweight``), with its ``__metadata__`` holding
``config`` (the diffusers ``QwenImageTransformer2DModel`` config as JSON; its loader needs
it), ``quantization_config`` (JSON; ``rank``, default 32, and ``weight.dtype`` ``int4`` or
``fp4_e2m1_all``) and ``model_class``. Its loader builds the model from ``config``, swaps
in the quantized layers with that rank and loads the state dict strictly, so a header that
disagrees with them would not load: each such disagreement is an error here, naming the key.

- ``SVDQW4A4Linear`` (fused ``attn.to_qkv`` / ``add_qkv_proj``, ``to_out.0``,
  ``to_add_out``, ``img_mlp``/``txt_mlp`` ``net.0.proj`` and ``net.2``): ``qweight``
  (out, in/2) int8; ``wscales`` (in/G, out), bf16/fp16 with G = 64 for int4, fp8 e4m3
  with G = 16 for nvfp4; ``smooth_factor`` and ``smooth_factor_orig`` (in,);
  ``proj_down`` (in, rank) and ``proj_up`` (out, rank), packed for its kernel; ``bias``
  (out,); nvfp4 only: ``wcscales`` (out,) and ``wtscale`` (a scalar; both optional, the
  loader fills them in).
- ``AWQW4A16Linear`` (``img_mod.1`` / ``txt_mod.1``): ``qweight`` (out/4, in/2) int32;
  ``wscales`` and ``wzeros`` (in/G, out), G = 64 by default; ``bias`` (out,).
- Everything else is unquantized: ``weight`` (out, in) and ``bias`` of ``nn.Linear``
  (``img_in``, ``txt_in``, ``proj_out``, ``norm_out.linear``, the timestep embedder) or a
  1-D ``weight`` of an RMSNorm (``txt_norm``, ``attn.norm_q`` ...).

:func:`meta_tree` is the pure part (``{key: (shape, dtype)}`` and the metadata -> module
tree); :func:`meta_transformer` reads the header with lora_core's bounded reader.
"""
from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

import torch
from torch import nn

from lora_core.inspection import SAFETENSORS_DTYPES as DTYPES  # safetensors dtype names -> torch dtypes

from .base import ModelPathError

HALF = (torch.float16, torch.bfloat16)  # what nunchaku's layers keep their 16-bit fields in
FLOAT = (torch.float64, torch.float32, *HALF)
SVDQ_FIELDS = ("qweight", "wscales", "smooth_factor", "smooth_factor_orig", "proj_down", "proj_up")
SVDQ_OPTIONAL = ("bias", "wcscales", "wtscale")
AWQ_FIELDS = ("qweight", "wscales", "wzeros")
DENSE_FIELDS = ("weight", "bias")
#: diffusers' QwenImageTransformer2DModel defaults, which nunchaku's ``from_config`` falls back on.
QWEN_IMAGE_DEFAULTS = {"num_layers": 60, "attention_head_dim": 128, "num_attention_heads": 24}
DEFAULT_RANK = 32  # nunchaku's, when quantization_config gives none
BLOCKS = "transformer_blocks"

Entries = Mapping[str, "tuple[Sequence[int], str]"]


class CheckpointError(ModelPathError):
    """A nunchaku checkpoint's header that its loader would not load; names the file and key."""

    def __init__(self, source: str, why: str, key: str | None = None):
        self.source, self.key = source, key
        super().__init__(f"{source}: " + (f"key {key!r}: " if key else "") + why)


def _meta(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class SVDQW4A4Linear(nn.Module):
    """nunchaku's SVDQuant W4A4 layer, its fields as meta tensors (no kernel, no forward)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], precision: str, group_size: int):
        super().__init__()
        self.out_features, half_in = tensors["qweight"].shape
        self.in_features = 2 * half_in
        self.rank = int(tensors["proj_down"].shape[1])
        self.precision, self.group_size = precision, group_size
        self.bias = None
        self.wcscales = None
        self.wtscale = None  # a float in nunchaku (1.0 unless the file holds it): its value is not read here
        for name, t in tensors.items():
            setattr(self, name, _meta(t))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"precision={self.precision}, device=meta")


class AWQW4A16Linear(nn.Module):
    """nunchaku's AWQ W4A16 layer, its fields as meta tensors (no kernel, no forward)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], group_size: int):
        super().__init__()
        quarter_out, half_in = tensors["qweight"].shape
        self.out_features, self.in_features = 4 * quarter_out, 2 * half_in
        self.group_size = group_size
        self.bias = None
        for name, t in tensors.items():
            setattr(self, name, _meta(t))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, device=meta"


class Norm(nn.Module):
    """An unquantized module with a 1-D ``weight`` (and ``bias``): the checkpoint's RMSNorms."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        super().__init__()
        self.bias = None
        for name, t in tensors.items():
            setattr(self, name, _meta(t))


def _fields(entries: Entries, source: str) -> dict[str, dict[str, torch.Tensor]]:
    """``{module path: {field: meta tensor}}``, each entry's shape and dtype checked."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, (shape, dtype_name) in entries.items():
        prefix, _, field = key.rpartition(".")
        if not prefix:
            raise CheckpointError(source, "a tensor outside any module (nunchaku's keys are module.field)", key)
        dtype = DTYPES.get(dtype_name)
        if dtype is None:
            raise CheckpointError(source, f"unknown dtype {dtype_name!r}", key)
        if not all(isinstance(d, int) and d >= 0 for d in shape):
            raise CheckpointError(source, f"bad shape {list(shape)}", key)
        out.setdefault(prefix, {})[field] = torch.empty(tuple(shape), dtype=dtype, device="meta")
    return out


class _Checks:
    """Shape and dtype checks of one module's fields, each failure naming its key."""

    def __init__(self, source: str, prefix: str, tensors: Mapping[str, torch.Tensor]):
        self.source, self.prefix, self.t = source, prefix, tensors

    def fail(self, field: str, why: str) -> None:
        raise CheckpointError(self.source, why, f"{self.prefix}.{field}")

    def only(self, kind: str, required: Sequence[str], optional: Sequence[str] = ()) -> None:
        for field in self.t:
            if field not in required and field not in optional:
                self.fail(field, f"a field an {kind} does not have (it has {', '.join((*required, *optional))})")
        for field in required:
            if field not in self.t:
                self.fail(field, f"missing: an {kind} has {', '.join(required)} (found {', '.join(sorted(self.t))})")

    def shape(self, field: str, want: tuple[int, ...], dtypes: Sequence[torch.dtype], what: str = "") -> None:
        t = self.t.get(field)
        if t is None:
            return
        if tuple(t.shape) != want:
            self.fail(field, f"shape {list(t.shape)}, expected {list(want)}{what}")
        if t.dtype not in dtypes:
            self.fail(field, f"dtype {t.dtype}, expected {' or '.join(str(d) for d in dtypes)}")


def _svdq(c: _Checks) -> SVDQW4A4Linear:
    c.only("SVDQW4A4Linear", SVDQ_FIELDS, SVDQ_OPTIONAL)
    t = c.t
    if t["qweight"].dim() != 2 or t["proj_down"].dim() != 2:
        c.fail("qweight" if t["qweight"].dim() != 2 else "proj_down", "expected a 2-D tensor")
    n_out, n_in, rank = t["qweight"].shape[0], 2 * t["qweight"].shape[1], t["proj_down"].shape[1]
    c.shape("qweight", (n_out, n_in // 2), (torch.int8,))
    fp4 = t["wscales"].dtype == torch.float8_e4m3fn
    group = 16 if fp4 else 64
    if n_in % group:
        c.fail("qweight", f"{n_in} inputs are not a multiple of the {group}-wide quantization groups")
    c.shape("wscales", (n_in // group, n_out), (torch.float8_e4m3fn,) if fp4 else HALF,
            f" ({n_in} inputs in groups of {group} by {n_out} outputs)")
    dtype = t["proj_down"].dtype
    c.shape("proj_down", (n_in, rank), HALF)
    c.shape("proj_up", (n_out, rank), (dtype,), f" (outputs by the rank of {c.prefix}.proj_down)")
    for field in ("smooth_factor", "smooth_factor_orig"):
        c.shape(field, (n_in,), (dtype,))
    c.shape("bias", (n_out,), (dtype,))
    for field in ("wcscales", "wtscale"):
        if field in t and not fp4:
            c.fail(field, "an nvfp4 field on an int4 layer (its wscales are not fp8)")
    c.shape("wcscales", (n_out,), (*FLOAT, torch.float8_e4m3fn))
    if "wtscale" in t and t["wtscale"].numel() != 1:
        c.fail("wtscale", f"a scalar expected, got shape {list(t['wtscale'].shape)}")
    return SVDQW4A4Linear(t, "nvfp4" if fp4 else "int4", group)


def _awq(c: _Checks) -> AWQW4A16Linear:
    c.only("AWQW4A16Linear", AWQ_FIELDS, ("bias",))
    t = c.t
    if t["qweight"].dim() != 2 or t["wscales"].dim() != 2 or t["wscales"].shape[0] == 0:
        c.fail("qweight" if t["qweight"].dim() != 2 else "wscales", "expected a 2-D tensor")
    n_out, n_in = 4 * t["qweight"].shape[0], 2 * t["qweight"].shape[1]
    c.shape("qweight", (n_out // 4, n_in // 2), (torch.int32,))
    groups = t["wscales"].shape[0]
    if n_in % groups:
        c.fail("wscales", f"{groups} groups do not divide the layer's {n_in} inputs")
    dtype = t["wscales"].dtype
    c.shape("wscales", (groups, n_out), HALF, f" ({n_out} outputs)")
    c.shape("wzeros", (groups, n_out), (dtype,))
    c.shape("bias", (n_out,), (dtype,))
    return AWQW4A16Linear(t, n_in // groups)


def _dense(c: _Checks) -> nn.Module:
    c.only("unquantized module", ("weight",), ("bias",))
    w = c.t["weight"]
    if w.dtype not in FLOAT:
        c.fail("weight", f"dtype {w.dtype}: an unquantized weight is floating point")
    if w.dim() == 1:
        c.shape("bias", tuple(w.shape), (w.dtype,))
        return Norm(c.t)
    if w.dim() != 2:
        c.fail("weight", f"a {w.dim()}-D weight (this builder knows linears and norms)")
    c.shape("bias", (w.shape[0],), (w.dtype,))
    linear = nn.Linear(w.shape[1], w.shape[0], bias="bias" in c.t, device="meta", dtype=w.dtype)
    for p in linear.parameters():
        p.requires_grad_(False)
    return linear


def _module(source: str, prefix: str, tensors: Mapping[str, torch.Tensor]) -> nn.Module:
    c = _Checks(source, prefix, tensors)
    if any(f in tensors for f in ("proj_down", "proj_up", "smooth_factor", "smooth_factor_orig")):
        return _svdq(c)
    if "wzeros" in tensors:
        return _awq(c)
    packed = [f for f in ("qweight", "wscales") if f in tensors]
    if packed:
        c.fail(packed[0], "a packed field without the rest of an SVDQW4A4Linear (proj_down, proj_up, "
                          "smooth_factor) or an AWQW4A16Linear (wzeros)")
    return _dense(c)


def _json(source: str, metadata: Mapping[str, str], key: str, required: bool) -> dict:
    text = metadata.get(key)
    if text is None:
        if required:
            raise CheckpointError(source, f"no {key!r} in its safetensors metadata: nunchaku's loader builds the "
                                          "model from it (is this a nunchaku SVDQ checkpoint?)")
        return {}
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as e:  # RecursionError: nested deeper than the parser recurses
        raise CheckpointError(source, f"metadata {key!r} is not valid JSON: {type(e).__name__}: {e}") from e
    if not isinstance(value, dict):
        raise CheckpointError(source, f"metadata {key!r} is not a JSON object")
    return value


def _int(source: str, config: Mapping, name: str, default: int, where: str = "config") -> int:
    value = config.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise CheckpointError(source, f"metadata {where} {name!r} is {value!r}, not a positive integer")
    return value


def _in_range(key: str, layers: int) -> bool:
    index = key.split(".")[1]
    return index.isdigit() and int(index) < layers


def _configs(source: str, metadata: Mapping[str, str]) -> tuple[dict, dict]:
    """``(config, quantization_config)`` of the metadata; a checkpoint of another model refused."""
    config = _json(source, metadata, "config", required=True)
    quant = _json(source, metadata, "quantization_config", required=False)
    model_class = metadata.get("model_class", "")
    if model_class and "QwenImage" not in model_class:
        raise CheckpointError(source, f"a {model_class} checkpoint: the nunchaku backend loads Qwen-Image")
    return config, quant


def _check_config(source: str, config: Mapping, quant: Mapping, modules: Mapping[str, nn.Module],
                  keys: Sequence[str]) -> None:
    """What nunchaku's loader builds from the metadata must be what the header holds."""
    rank = _int(source, quant, "rank", DEFAULT_RANK, "quantization_config")
    weight = quant.get("weight")
    dtype = weight.get("dtype") if isinstance(weight, dict) else None
    want_fp4 = {"int4": False, "fp4_e2m1_all": True}.get(dtype) if isinstance(dtype, str) else None
    svdq = {n: modules[n] for n in sorted(modules, key=_path_order) if isinstance(modules[n], SVDQW4A4Linear)}
    if not svdq:
        raise CheckpointError(source, "no SVDQW4A4Linear layer (no *.qweight with *.proj_down): not a nunchaku "
                                      "SVDQ checkpoint")
    for name, m in svdq.items():
        if m.rank != rank:
            raise CheckpointError(source, f"rank {m.rank}, but quantization_config says {rank} (the loader builds "
                                          "its layers with that rank)", f"{name}.proj_down")
        if want_fp4 is not None and (m.precision == "nvfp4") != want_fp4:
            raise CheckpointError(source, f"{m.precision} scales, but quantization_config's weight dtype is "
                                          f"{weight.get('dtype')!r}", f"{name}.wscales")
    layers = _int(source, config, "num_layers", QWEN_IMAGE_DEFAULTS["num_layers"])
    inner = (_int(source, config, "num_attention_heads", QWEN_IMAGE_DEFAULTS["num_attention_heads"])
             * _int(source, config, "attention_head_dim", QWEN_IMAGE_DEFAULTS["attention_head_dim"]))
    extra = sorted(k for k in keys if k.startswith(BLOCKS + ".") and not _in_range(k, layers))
    if extra:
        raise CheckpointError(source, f"a block past config num_layers = {layers} (blocks 0..{layers - 1})", extra[0])
    for i in range(layers):
        qkv = f"{BLOCKS}.{i}.attn.to_qkv"
        m = modules.get(qkv)
        if not isinstance(m, SVDQW4A4Linear):
            raise CheckpointError(source, f"missing: config num_layers is {layers}, so the loader builds block {i} "
                                          "with an SVDQ to_qkv", f"{qkv}.qweight")
        if (m.in_features, m.out_features) != (inner, 3 * inner):
            raise CheckpointError(source, f"{m.in_features} -> {m.out_features}, but config's heads x head_dim = "
                                          f"{inner} make it {inner} -> {3 * inner}", f"{qkv}.qweight")


def meta_tree(entries: Entries, metadata: Mapping[str, str], source: str = "checkpoint") -> nn.Module:
    """The module tree a nunchaku Qwen-Image checkpoint loads into, on the meta device, from its
    header: ``entries`` maps each tensor key to ``(shape, safetensors dtype name)``, ``metadata``
    is the header's ``__metadata__``. Errors (``CheckpointError``) name ``source`` and the key."""
    config, quant = _configs(source, metadata)  # first: without them it is no nunchaku checkpoint at all
    groups = _fields(entries, source)
    modules = {prefix: _module(source, prefix, tensors) for prefix, tensors in groups.items()}
    _check_config(source, config, quant, modules, sorted(entries))
    root = nn.Module()
    placed: dict[str, nn.Module] = {"": root}
    for prefix in sorted(modules, key=_path_order):  # a module before its children, blocks in number order
        parent, _, leaf = prefix.rpartition(".")
        try:
            _container(placed, parent).add_module(leaf, modules[prefix])
        except KeyError as e:  # torch's: a tensor of that name already there, or an empty name
            parts = prefix.split(".")
            tensor = next((p for p in (".".join(parts[:i]) for i in range(1, len(parts) + 1)) if p in entries), None)
            why = (f"{tensor!r} is a tensor of this header and also a module on this key's path" if tensor else
                   f"module {prefix!r} cannot be placed in the tree: {e.args[0]}")
            raise CheckpointError(source, why, f"{prefix}.{min(groups[prefix])}") from e
        placed[prefix] = modules[prefix]
    return root


def _path_order(name: str) -> tuple:
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in name.split("."))


def _container(placed: dict[str, nn.Module], name: str) -> nn.Module:
    """The module at ``name``, made (an empty ``nn.Module``, as its parents) if the header has none there."""
    if name not in placed:
        parent, _, leaf = name.rpartition(".")
        box = nn.Module()
        _container(placed, parent).add_module(leaf, box)
        placed[name] = box
    return placed[name]


def meta_transformer(path: str | os.PathLike) -> nn.Module:
    """The nunchaku Qwen-Image transformer of checkpoint ``path`` on the meta device: its header
    read (bounded, ``lora_core.safetensors_io``), no tensor data read, nothing allocated."""
    from lora_core.errors import LoraError
    from lora_core.safetensors_io import read_header, read_metadata

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelPathError(f"nunchaku transformer not found: {path!r} (the .safetensors checkpoint)")
    try:
        header = read_header(path)
        metadata = read_metadata(path)
    except LoraError as e:  # the bounded reader's errors already name the file (and the key)
        raise ModelPathError(f"not a readable safetensors checkpoint: {e}") from e
    return meta_tree({k: (v["shape"], v["dtype"]) for k, v in header.items()}, metadata, source=path)
