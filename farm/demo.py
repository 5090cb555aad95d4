"""`make demo`: LoRA files for the embedded tiny model, then examples/demo.yaml on the farm.

The LoRAs are written against ``TINY_TRANSFORMER_CONFIG`` in real key formats (PEFT and
kohya), so the demo exercises the same loading path as files from the wild.
"""
from __future__ import annotations

import os
import sys

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")

# name -> (key scheme, which modules, rank, seed, scale of the random factors)
DEMO_LORAS = {
    "style": ("peft", ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"), 8, 1, 0.6),
    "detail": ("kohya", ("img_mlp.net.0.proj", "img_mlp.net.2"), 4, 2, 0.5),
    "character": ("peft", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "img_mod.1"), 8, 3, 0.4),
}


def write_demo_loras(directory: str = os.path.join(EXAMPLES, "loras")) -> dict[str, str]:
    """Deterministic LoRA files for the tiny model; rewritten only when missing."""
    import torch
    from diffusers import QwenImageTransformer2DModel

    from lora_core import synthetic as S
    from workers.backends.tiny import TINY_TRANSFORMER_CONFIG

    os.makedirs(directory, exist_ok=True)
    with torch.device("meta"):
        model = QwenImageTransformer2DModel(**TINY_TRANSFORMER_CONFIG)
    paths = {}
    for name, (scheme, include, rank, seed, scale) in DEMO_LORAS.items():
        path = os.path.join(directory, f"{name}.safetensors")
        paths[name] = path
        if os.path.exists(path):
            continue
        layers = S.random_layers(S.linear_shapes(model, include), rank=rank, seed=seed, scale=scale)
        sd = S.peft_state_dict(layers) if scheme == "peft" else S.kohya_state_dict(layers, prefix="lora_unet_")
        S.write_safetensors(path + ".tmp", sd, metadata={"lora_farm_demo": name})
        os.replace(path + ".tmp", path)
    return paths


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    write_demo_loras()
    from .cli import main as farm_main

    manifest = os.path.join(EXAMPLES, "demo.yaml")
    out = argv[0] if argv else "demo-out"
    print(f"running {manifest} -> {out}/", flush=True)
    code = farm_main(["run", manifest, "--out", out, "--workers", "2"])
    if code in (0, 1):
        farm_main(["report", out])
    return code


if __name__ == "__main__":
    sys.exit(main())
