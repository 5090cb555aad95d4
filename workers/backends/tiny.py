"""The embedded default model: a real Qwen-Image pipeline, tiny, built in-process.

By default its weights are the project's own, trained on pictures of coloured shapes
(``python -m training`` reproduces them from a seed; they live in ``tiny_trained/`` with
their checksums): prompts such as "a red circle on a blue background" draw what they say at
128x128. ``weights: random`` (or any ``seed``) builds the same architecture with seeded random
weights instead, for tests that need a model of any kind quickly.

Every part is the real diffusers/transformers class (``QwenImageTransformer2DModel``,
``AutoencoderKLQwenImage`` with the real 8x downscale, a ``Qwen2_5_VLForConditionalGeneration``
text encoder, ``FlowMatchEulerDiscreteScheduler`` with Qwen-Image's schedule) at a size that
renders a 256x256, 4-step image in well under a second on one CPU core. Nothing is
downloaded: weights are drawn from a seeded ``torch.Generator``, the tokenizer is a
byte-level BPE trained on a built-in corpus. Same seed -> same weights -> same image bytes.

LoRAs for it are written against :data:`TINY_TRANSFORMER_CONFIG` (module names such as
``transformer_blocks.0.attn.to_q``, inner dim 128).
"""
from __future__ import annotations

import copy
import json
import math
import os
from typing import Any, Mapping

import torch

from storage.localfs import hash_file

from .base import COMMON_KEYS, BackendSpecError, check_spec, resolve_device, resolve_dtype
from .diffusers_backend import PipelineBackend

#: Keyword arguments of the tiny ``QwenImageTransformer2DModel``: 2 blocks, 4 heads x 32.
TINY_TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": 2,
    "in_channels": 64,  # 16 latent channels x 2x2 packing, as in Qwen-Image
    "out_channels": 16,
    "num_layers": 2,
    "attention_head_dim": 32,
    "num_attention_heads": 4,
    "joint_attention_dim": 64,  # = the text encoder's hidden size
    "guidance_embeds": False,
    "axes_dims_rope": [8, 12, 12],  # frame, height, width; sums to the head dim
}

#: Step-cache ratios of the tiny model with its trained weights, 8 steps (``StepCache(calibrate=True)``,
#: mean of three prompts: tests/workers/test_stepcache.py); resampled to other step counts by the cache.
TINY_MAG_RATIOS: list[float] = [1.0, 0.92375, 1.05108, 1.04197, 1.03807, 1.03121, 1.00088, 0.80329]

TINY_VAE_CONFIG: dict[str, Any] = {
    "base_dim": 8, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 1,
    "attn_scales": [], "temperal_downsample": [False, True, True], "dropout": 0.0,
}

# Qwen-Image's own schedule (its scheduler_config.json): resolution-dependent shift.
TINY_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": True, "base_shift": 0.5,
    "max_shift": 0.9, "base_image_seq_len": 256, "max_image_seq_len": 8192, "shift_terminal": 0.02,
    "time_shift_type": "exponential", "invert_sigmas": False, "stochastic_sampling": False,
}

TEXT_HIDDEN = TINY_TRANSFORMER_CONFIG["joint_attention_dim"]
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]

# QwenImagePipeline drops the first 34 tokens (its system prompt) of every encoded prompt,
# counted with the real Qwen tokenizer. Training on the template makes each of its words
# one token here too, so the same 34 tokens are dropped and nothing of the user prompt.
_SYSTEM = ("Describe the image by detailing the color, shape, size, texture, quantity, text, spatial "
           "relationships of the objects and background:")
_CORPUS_WORDS = (
    "system user assistant a an the of in on at with and by under over near from to into its one two three "
    "cat dog fox bird horse fish owl rabbit tiger dragon robot person woman man child girl boy face portrait "
    "house castle city street forest tree flower garden mountain hill river lake sea ocean beach sky cloud "
    "rain snow sun sunset sunrise moon star night day light shadow fire water stone wood glass metal paper "
    "red orange yellow green blue purple pink white black gray brown gold silver dark bright soft sharp "
    "small large tiny huge old new happy sad calm wild painting photo photograph drawing sketch style "
    "watercolor oil anime cartoon cinematic detailed realistic studio lighting close up wide shot view "
    "sitting standing running flying walking looking holding wearing hat coat dress glasses book cup table "
    "circle square triangle background"
)

#: The trained weights: transformer, VAE and text encoder (fp16 safetensors), ``meta.json`` (the VAE's
#: latent statistics, what trained them) and ``SHA256SUMS``.
TRAINED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_trained")
TRAINED_PARTS = ("transformer", "vae", "text_encoder")


def _train_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    words = _CORPUS_WORDS.split()
    # Each word both after a space and at the start of a piece (after "\n"), as prompts use them.
    corpus = [_SYSTEM] * 8 + [" ".join(words)] * 4 + words * 4
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                   model_max_length=2048)


def _text_encoder_config(tokenizer: Any) -> Any:
    from transformers import Qwen2_5_VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(
        vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=2 * TEXT_HIDDEN,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
        # Multimodal RoPE: temporal/height/width sections of the 16 rotary pairs of a 32-dim head.
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [4, 6, 6]},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=TEXT_HIDDEN,
                  fullatt_block_indexes=[0])
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                            video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                            vision_end_token_id=ids["<|vision_end|>"])


@torch.no_grad()
def _init_weights(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Redraw every weight matrix and its bias from ``generator`` (PyTorch's default ranges).

    The constructors also draw from the global RNG; redrawing makes the weights depend on
    our seed only (not on construction order inside diffusers/transformers), and leaves
    norm scales at their constructed values.
    """
    for _name, sub in sorted(module.named_modules(), key=lambda kv: kv[0]):
        weight = getattr(sub, "weight", None)
        if not isinstance(weight, torch.nn.Parameter) or weight.ndim < 2:
            continue
        bound = 1.0 / math.sqrt(weight[0].numel())
        weight.uniform_(-bound, bound, generator=generator)
        bias = getattr(sub, "bias", None)
        if isinstance(bias, torch.nn.Parameter):
            bias.uniform_(-bound, bound, generator=generator)


def build_tiny_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32, vae_config: Mapping[str, Any] | None = None) -> Any:
    """A ``QwenImagePipeline`` with tiny random weights; deterministic in ``seed``.
    ``vae_config`` adds to :data:`TINY_VAE_CONFIG` (the trained model's latent statistics)."""
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLForConditionalGeneration

    tokenizer = _train_tokenizer()
    with torch.random.fork_rng(devices=[]):  # constructors draw from the global RNG: leave the caller's alone
        torch.manual_seed(seed)
        transformer = QwenImageTransformer2DModel(**copy.deepcopy(TINY_TRANSFORMER_CONFIG))
        vae = AutoencoderKLQwenImage(**{**copy.deepcopy(TINY_VAE_CONFIG), **dict(vae_config or {})})
        text_encoder = Qwen2_5_VLForConditionalGeneration(_text_encoder_config(tokenizer))
    for i, part in enumerate((transformer, vae, text_encoder)):
        _init_weights(part, torch.Generator().manual_seed(seed * 1000 + i))
        part.eval()
        if dtype != torch.float32:
            part.to(dtype)
    scheduler = FlowMatchEulerDiscreteScheduler(**TINY_SCHEDULER_CONFIG)
    pipe = QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                             transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def trained_meta(directory: str = TRAINED_DIR) -> dict[str, Any]:
    with open(os.path.join(directory, "meta.json"), encoding="utf-8") as f:
        return json.load(f)


def tokenizer_digest(tokenizer: Any) -> str:
    """sha256 of the tokenizer's whole definition (vocabulary, merges, settings): the trained text
    encoder's embeddings are rows of token ids this tokenizer gives, and it is trained from code."""
    import hashlib

    definition = json.loads(tokenizer.backend_tokenizer.to_str())
    for setting in ("padding", "truncation"):  # set per call by whoever encodes with it, not what it is
        definition.pop(setting, None)
    return hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()


def build_trained_pipeline(dtype: torch.dtype = torch.float32, directory: str = TRAINED_DIR) -> Any:
    """The tiny pipeline with the project's trained weights (checked against ``SHA256SUMS``, and
    the tokenizer built here against the one they were trained with)."""
    from safetensors.torch import load_file

    check_trained(directory)
    meta = trained_meta(directory)
    pipe = build_tiny_pipeline(0, torch.float32, vae_config=meta["vae_config"])
    if "tokenizer_sha256" in meta and tokenizer_digest(pipe.tokenizer) != meta["tokenizer_sha256"]:
        raise RuntimeError(f"the tiny tokenizer built here is not the one the weights in {directory} were "
                           "trained with (its corpus or the tokenizers package changed): train again "
                           "(`python -m training`) or restore them")
    for part in TRAINED_PARTS:
        module = getattr(pipe, part)
        state = load_file(os.path.join(directory, f"{part}.safetensors"))
        missing, unexpected = module.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
        # tied or derived buffers (rotary tables) are rebuilt by the constructor, not stored
        if unexpected or any(not k.endswith(("inv_freq", "pos_freqs", "neg_freqs")) for k in missing):
            raise RuntimeError(f"{part}.safetensors in {directory} does not fit the tiny model: "
                               f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
        if dtype != torch.float32:
            module.to(dtype)
    return pipe


def read_sums(directory: str, hint: str = "") -> dict[str, str]:
    """``directory/SHA256SUMS`` as {file name: sha256}: ``RuntimeError`` if it is missing or a line
    is not ``<sha256>  <file name>`` (``hint`` says how to get the files back)."""
    sums = os.path.join(directory, "SHA256SUMS")
    if not os.path.exists(sums):
        raise RuntimeError(f"{sums} is missing{hint}")
    out = {}
    for n, line in enumerate(open(sums, encoding="utf-8").read().splitlines(), 1):
        fields = line.split(maxsplit=1)
        if len(fields) != 2 or len(fields[0]) != 64:
            raise RuntimeError(f"{sums}, line {n}: expected '<sha256>  <file name>'{hint}")
        out[fields[1]] = fields[0]
    return out


def check_sums(directory: str, hint: str = "") -> list[str]:
    """The files ``directory/SHA256SUMS`` lists, each checked: ``RuntimeError`` naming the one
    that is missing or whose bytes differ (``hint`` says how to get them back)."""
    sums = os.path.join(directory, "SHA256SUMS")
    paths = []
    for name, digest in read_sums(directory, hint).items():
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            raise RuntimeError(f"{path} is missing (listed in {sums}){hint}")
        if hash_file(path)[0] != digest:
            raise RuntimeError(f"{path} is not the file {sums} lists{hint}")
        paths.append(path)
    return paths


def check_trained(directory: str = TRAINED_DIR) -> None:
    check_sums(directory, ": the trained weights come with the repository (`python -m training` writes "
                          "them again; `weights: random` needs none)")


def save_tiny_pipeline(directory: str | os.PathLike, seed: int = 0) -> str:
    """``save_pretrained`` of the tiny pipeline: a directory the diffusers backend can load."""
    directory = os.fspath(directory)
    build_tiny_pipeline(seed).save_pretrained(directory, safe_serialization=True)
    return directory


def template_prefix_tokens(pipe: Any) -> int:
    """How many tokens the pipeline's prompt template puts before the user prompt."""
    prefix = pipe.prompt_template_encode.split("{}")[0]
    return len(pipe.tokenizer(prefix).input_ids)


class TinyBackend(PipelineBackend):
    """The tiny pipeline as a backend. Spec keys: ``weights`` (``trained``, the default, or
    ``random``), ``seed`` (of random weights, 0; a seed alone means random weights), ``dtype``
    (float32), ``batch``, ``step_cache``, ``rope``.

    ``batch`` is off by default: on CPU a batched pipeline call gives images that differ from
    the same requests rendered alone by a pixel level here and there (other batch sizes,
    other kernel blockings), and the tiny model exists to make results exactly repeatable.
    With ``batch: false`` an image's bytes depend only on its request (and, as for every
    CPU model, on torch's thread count: fix ``torch.set_num_threads`` for repeatable bytes).
    """

    KEYS = COMMON_KEYS | {"seed", "batch", "weights"}

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any] | None = None, device: str | torch.device | None = None) -> "TinyBackend":
        spec = dict(spec or {"backend": "tiny"})
        check_spec(spec, cls.KEYS)
        dev = resolve_device(device)
        # fp32 by default even on GPUs: the tiny model is for tests and demos, exactness first.
        dtype = resolve_dtype(spec.get("dtype") if spec.get("dtype") not in (None, "auto") else "float32", dev)
        weights = spec.get("weights", "random" if "seed" in spec else "trained")
        if weights == "trained":
            if "seed" in spec:
                raise BackendSpecError(["seed: chooses random weights; it cannot go with `weights: trained`"])
            pipe = build_trained_pipeline(dtype).to(dev)
        elif weights == "random":
            pipe = build_tiny_pipeline(int(spec.get("seed", 0)), dtype).to(dev)
        else:
            raise BackendSpecError([f"weights: must be 'trained' or 'random', not {weights!r}"])
        return cls(pipe, name="tiny", device=dev, dtype=dtype, step_cache=spec.get("step_cache"),
                   rope=spec.get("rope"), batch=bool(spec.get("batch", False)))


def meta_transformer() -> torch.nn.Module:
    """The tiny transformer on the meta device: every module and shape, no weight allocated
    (what ``farm validate --deep`` binds LoRAs against)."""
    from diffusers import QwenImageTransformer2DModel

    with torch.device("meta"):
        return QwenImageTransformer2DModel(**copy.deepcopy(TINY_TRANSFORMER_CONFIG))
