"""The rule engine: every key of a LoRA file is consumed by its scheme's rules, or we fail.

``classify(keys)`` picks the one scheme whose predicate matches, maps each key to
(target, role), strips the container prefixes (``transformer.``, ``diffusion_model.``,
``base_model.model.``, ``lora_unet_`` ...), and reports every key no rule consumes. It
reads no tensor: it runs on the header's key list, so a bad file fails before any I/O.
Results are memoized on the key set: the same file layout is classified once.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Mapping

from .errors import AmbiguousFormatError, LoraError, UnknownKeysError, UnsupportedFormatError, shorten, shown_list
from .formats import SCHEMES, nunchaku_converted, unsupported

# Dotted containers in front of the model's own module path, longest first.
DOTTED_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "unet.", "model.")
# Underscored containers (kohya / LyCORIS); what follows is an underscored module path.
UNDERSCORE_PREFIXES = ("lora_unet_", "lora_transformer_", "lycoris_")
# Text encoders' containers in kohya-style files (sd-scripts ``lora_te_``/``lora_te1_``..., OneTrainer
# ``lora_te1_`` CLIP-L, ``lora_te2_`` T5): lora_core applies to the diffusion transformer only.
TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")


@dataclass(frozen=True)
class KeyMap:
    scheme: str
    #: target -> {"A": key, "B": key, "alpha": key (optional)}
    entries: Mapping[str, Mapping[str, str]]


def strip_prefix(target: str) -> str:
    for p in UNDERSCORE_PREFIXES:
        if target.startswith(p):
            return target[len(p):]
    for p in DOTTED_PREFIXES:
        if target.startswith(p):
            return target[len(p):]
    return target


def classify(keys: Iterable[str], source: str | None = None) -> KeyMap:
    try:
        return _classify(tuple(sorted(keys)))
    except LoraError as e:
        if e.source is None and source is not None:
            e.source = source
            e.args = (f"{e.args[0]} (file {shorten(source, 300)!r})",)
        raise


@lru_cache(maxsize=256)
def _classify(keys: tuple[str, ...]) -> KeyMap:
    kind = unsupported.detect(keys)
    if kind:
        raise UnsupportedFormatError(f"unsupported adapter format: {kind} (only low-rank LoRA B@A is supported)")
    if nunchaku_converted.detect(keys):  # its Qwen-Image or Flux layout
        scheme, entries = nunchaku_converted.classify(keys)
        return KeyMap(scheme=scheme, entries=entries)
    matches = [s for s in SCHEMES if s.detect(keys)]
    if not matches:
        raise UnknownKeysError(list(keys), reason="match no known LoRA key scheme (peft, kohya, lycoris)")
    if len(matches) > 1:
        names = ", ".join(s.NAME for s in matches)
        raise AmbiguousFormatError(f"keys match several LoRA key schemes ({names}); refusing to guess")
    scheme = matches[0]
    entries: dict[str, dict[str, str]] = {}
    unknown: list[str] = []
    for key in keys:
        for r in scheme.RULES:
            m = r.pattern.match(key)
            if m:
                entries.setdefault(strip_prefix(m.group("target")), {})[r.role] = key
                break
        else:
            unknown.append(key)
    if unknown:
        raise UnknownKeysError(unknown, reason=f"are not {scheme.NAME} LoRA keys")
    _refuse_text_encoders(entries)
    _check_complete(entries)
    return KeyMap(scheme=scheme.NAME, entries=entries)


def _check_complete(entries: Mapping[str, Mapping[str, str]]) -> None:
    lonely = sorted(
        key for roles in entries.values() if not ("A" in roles and "B" in roles) for key in roles.values()
    )
    if lonely:
        raise UnknownKeysError(lonely, reason="have no matching down/up partner (each target needs both A and B)")


def _refuse_text_encoders(entries: Mapping[str, Mapping[str, str]]) -> None:
    """A file that also trains a text encoder is refused whole, saying why: rendering with its
    transformer part alone is not what the file means, and the farm's result would not say so."""
    te = sorted(t for t in entries if t.startswith(TEXT_ENCODER_PREFIXES))
    if te:
        raise UnsupportedFormatError(
            f"text-encoder LoRA: {len(te)} target(s) train a text encoder ({shown_list(te)}); lora_core applies "
            "LoRAs to the diffusion transformer only, and the transformer part alone is not what the file means: "
            "save it without text-encoder training, or drop the lora_te* keys yourself to use that part alone")
