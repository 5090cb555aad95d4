"""Every training stage in order, from one seed: the VAE, its latent statistics, the
transformer, then the demo LoRAs on the trained transformer. Writes the weights (fp16
safetensors), ``meta.json``, ``SHA256SUMS`` and ``train_log.json`` (each stage's loss curve
and seconds)."""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from .common import Curve
from .dit import train_transformer
from .lora import DEMO_LORAS, train_lora
from .vae import latent_stats, train_vae


@dataclass(frozen=True)
class Sizes:
    """How long each stage trains. The defaults made the committed weights; ``quick`` is for
    tests of the script itself."""

    vae_steps: int = 1600
    vae_crop: int = 64
    pictures: int = 4096
    dit_steps: int = 5000
    lora_pictures: int = 1024
    lora_steps: int = 800


QUICK = Sizes(vae_steps=4, vae_crop=32, pictures=64, dit_steps=6, lora_pictures=32, lora_steps=4)


def _sha256(path: str) -> str:
    from storage.localfs import hash_file

    return hash_file(path)[0]


def _save(path: str, state: dict) -> None:
    from safetensors.torch import save_file

    tmp = path + ".tmp"
    save_file({k: v.detach().to(torch.float16).contiguous() for k, v in state.items()}, tmp)
    os.replace(tmp, path)


def _round_to_fp16(module: torch.nn.Module) -> None:
    """What is rendered is what is shipped: the LoRAs train on the fp16-rounded weights."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.half().float())


def train_all(weights_dir: str, loras_dir: str, seed: int = 0, sizes: Sizes = Sizes(),
              log: Callable[[str], None] = print) -> dict:
    from workers.backends.tiny import TRAINED_PARTS, build_tiny_pipeline, tokenizer_digest

    t0 = time.perf_counter()
    curves: list[Curve] = []
    vae, curve = train_vae(seed, steps=sizes.vae_steps, crop=sizes.vae_crop, log=log)
    curves.append(curve)
    mean, std = latent_stats(vae, seed)
    vae_config = {"latents_mean": mean, "latents_std": std}
    pipe = build_tiny_pipeline(seed, torch.float32, vae_config=vae_config)
    pipe.vae.load_state_dict(vae.state_dict())
    ema, curve = train_transformer(pipe, seed, pictures=sizes.pictures, steps=sizes.dit_steps, log=log)
    curves.append(curve)
    pipe.transformer.load_state_dict(ema.state_dict())
    for part in TRAINED_PARTS:
        _round_to_fp16(getattr(pipe, part))
    os.makedirs(weights_dir, exist_ok=True)
    files = {}
    for part in TRAINED_PARTS:
        path = os.path.join(weights_dir, f"{part}.safetensors")
        _save(path, getattr(pipe, part).state_dict())
        files[os.path.basename(path)] = _sha256(path)
    curves += _train_loras(pipe, loras_dir, seed, sizes, log)
    meta = {"vae_config": vae_config, "seed": seed, "sizes": asdict(sizes), "loras": _lora_specs(),
            "tokenizer_sha256": tokenizer_digest(pipe.tokenizer)}
    log_doc = {"seed": seed, "seconds": round(time.perf_counter() - t0, 1), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "machine": platform.machine(),
               "stages": [c.to_json(every=max(1, min(25, len(c.losses)))) for c in curves]}
    _write_docs(weights_dir, meta, log_doc, files)
    return log_doc


def train_loras_only(weights_dir: str, loras_dir: str, seed: int = 0, sizes: Sizes = Sizes(),
                     log: Callable[[str], None] = print) -> dict:
    """The LoRA stage alone, on the committed weights (checked against ``SHA256SUMS``): the
    same LoRAs ``train_all`` makes, since it trains them on the same fp16-rounded weights it
    wrote. ``train_log.json`` keeps the other stages' curves and replaces the LoRAs'."""
    from workers.backends.tiny import build_trained_pipeline, read_sums, trained_meta

    with open(os.path.join(weights_dir, "train_log.json"), encoding="utf-8") as f:
        log_doc = json.load(f)
    meta = trained_meta(weights_dir)
    if meta["seed"] != seed:
        raise ValueError(f"the weights in {weights_dir} were trained from seed {meta['seed']}, not {seed}")
    pipe = build_trained_pipeline(directory=weights_dir)
    curves = _train_loras(pipe, loras_dir, seed, sizes, log)
    kept = [st for st in log_doc["stages"] if not st["name"].startswith("lora ")]
    new = [c.to_json(every=max(1, min(25, len(c.losses)))) for c in curves]
    log_doc["seconds"] = round(sum(st["seconds"] for st in kept + new), 1)
    log_doc["stages"] = kept + new
    log_doc["threads_loras"] = torch.get_num_threads()
    meta["sizes"]["lora_pictures"], meta["sizes"]["lora_steps"] = sizes.lora_pictures, sizes.lora_steps
    meta["loras"] = _lora_specs()
    _write_docs(weights_dir, meta, log_doc, read_sums(weights_dir))
    return log_doc


def _lora_specs() -> dict:
    return {n: {**asdict(s), "include": list(s.include)} for n, s in DEMO_LORAS.items()}


def _train_loras(pipe, loras_dir: str, seed: int, sizes: Sizes, log: Callable[[str], None]) -> list[Curve]:
    from lora_core.synthetic import write_safetensors

    os.makedirs(loras_dir, exist_ok=True)
    curves, lora_sums = [], {}
    for name, spec in DEMO_LORAS.items():
        state, curve = train_lora(pipe, name, seed, pictures=sizes.lora_pictures, steps=sizes.lora_steps,
                                  noise_bias=spec.noise_bias, log=log)
        curves.append(curve)
        path = os.path.join(loras_dir, f"{name}.safetensors")
        # one metadata entry: safetensors writes a header's metadata in hash-map order, so two or more
        # entries give different bytes (and checksums) for the same LoRA from run to run
        about = json.dumps({"name": name, "kind": spec.kind, "effect": spec.effect, "trained_seed": seed}, sort_keys=True)
        write_safetensors(path + ".tmp", state, metadata={"lora_farm_demo": about})
        os.replace(path + ".tmp", path)
        lora_sums[os.path.basename(path)] = _sha256(path)
    with open(os.path.join(loras_dir, "SHA256SUMS"), "w", encoding="utf-8") as f:
        f.writelines(f"{digest}  {name}\n" for name, digest in sorted(lora_sums.items()))
    return curves


def _write_docs(weights_dir: str, meta: dict, log_doc: dict, files: dict[str, str]) -> None:
    for name, doc in (("meta.json", meta), ("train_log.json", log_doc)):
        with open(os.path.join(weights_dir, name), "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
    files["meta.json"] = _sha256(os.path.join(weights_dir, "meta.json"))
    with open(os.path.join(weights_dir, "SHA256SUMS"), "w", encoding="utf-8") as f:
        f.writelines(f"{digest}  {name}\n" for name, digest in sorted(files.items()))
