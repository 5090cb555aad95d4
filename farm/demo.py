"""`make demo`: examples/demo.yaml on the farm, then its report.

The model is the embedded tiny Qwen-Image pipeline with the project's trained weights, the
LoRAs are the ones trained on it (``examples/loras/``, written by ``python -m training`` in
real key formats: PEFT and kohya, so the demo exercises the same loading path as files from
the wild). Both are checked against their ``SHA256SUMS`` before anything starts.
"""
from __future__ import annotations

import os
import sys

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
LORAS = os.path.join(EXAMPLES, "loras")


def check_demo_loras(directory: str = LORAS) -> list[str]:
    """The demo LoRA files, each checked against its ``SHA256SUMS``."""
    from workers.backends.tiny import check_sums

    return check_sums(directory, ": the demo LoRAs come with the repository (`python -m training` writes them again)")


def copy_demo_loras(directory: str) -> dict[str, str]:
    """The checked demo LoRAs copied into ``directory`` (for a farm whose LoRA roots are its own):
    {name: path}."""
    import shutil

    os.makedirs(directory, exist_ok=True)
    out = {}
    for path in check_demo_loras():
        name = os.path.basename(path)
        out[name.removesuffix(".safetensors")] = shutil.copyfile(path, os.path.join(directory, name))
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    check_demo_loras()
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
