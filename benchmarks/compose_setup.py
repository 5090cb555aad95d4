"""Parts of the compose benchmark: the model, the LoRA files, the peer's calls, the floors
and the correctness checks. See ``benchmarks/compose.py`` for what is measured.
"""
from __future__ import annotations

import contextlib
import logging
import os
import statistics
import time
from typing import Callable, Sequence

import torch
from torch import nn

from testsupport import lora as T

# The attention and MLP linears (and modulation) of every block, as real Qwen-Image LoRAs cover.
TARGETS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
    "attn.add_v_proj", "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj",
    "txt_mlp.net.2", "img_mod.1", "txt_mod.1",
)
DTYPE = torch.bfloat16
POOL = 2**22 + 7  # random values tiled into the weights: init at copy speed, not randn speed
STRENGTHS_X = (0.8, 0.6, 0.5)
STRENGTHS_Y = (0.7, 0.9, 0.4)


# ---- timing -------------------------------------------------------------------------------
def wall_timer(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# The seam every cell's timing goes through: ``use_timer`` swaps it (benchmarks/gpu.py: CUDA events).
_TIMER: list[Callable[[Callable[[], object]], float]] = [wall_timer]


def timed(fn: Callable[[], object]) -> float:
    """Seconds ``fn`` takes, by the current timer (wall clock unless ``use_timer`` set another)."""
    return _TIMER[0](fn)


@contextlib.contextmanager
def use_timer(timer: Callable[[Callable[[], object]], float]):
    """Time every cell with ``timer`` (``fn -> seconds``) inside the ``with`` block."""
    old, _TIMER[0] = _TIMER[0], timer
    try:
        yield timer
    finally:
        _TIMER[0] = old


def repeat(fn: Callable[[], object], n: int, before: Callable[[], object] | None = None) -> list[float]:
    """``n`` timings of ``fn``; ``before`` (untimed) runs ahead of each."""
    out = []
    for _ in range(n):
        if before is not None:
            before()
        out.append(timed(fn))
    return out


def steady_allocator() -> bool:
    """Fix glibc malloc's thresholds (``mallopt``; glibc only, False elsewhere): blocks up
    to 32 MiB come from the heap and freed memory is kept for reuse, instead of being
    returned to the kernel and faulted in (zeroed) again on the next allocation. That is
    what a GPU's caching allocator does; the default, adaptive thresholds make a CPU
    figure for code that allocates fresh tensors depend on what was freed before. Not
    undone: call it last."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return libc.mallopt(m_mmap_threshold, 32 << 20) == 1 and libc.mallopt(m_trim_threshold, 2**31 - 1) == 1


def med(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


# ---- the model ----------------------------------------------------------------------------
def qwen_config(blocks: int) -> dict:
    """Qwen-Image's real defaults from the installed diffusers, with ``blocks`` blocks."""
    import inspect

    from diffusers import QwenImageTransformer2DModel

    sig = inspect.signature(QwenImageTransformer2DModel.__init__)
    cfg = {k: p.default for k, p in sig.parameters.items() if k != "self" and p.default is not inspect.Parameter.empty}
    cfg["num_layers"] = blocks
    return cfg


def build_model(blocks: int, seed: int = 0, device: str | torch.device = "cpu", **config) -> nn.Module:
    """Real-width QwenImageTransformer2DModel, bf16, built on meta and filled from a random pool
    on ``device`` (allocated there in bf16, no fp32 copy); ``config`` overrides Qwen-Image's.

    Only the parameters are filled (buffers such as RoPE tables are not used here: nothing
    runs the whole model forward).
    """
    from diffusers import QwenImageTransformer2DModel

    logging.getLogger("diffusers").setLevel(logging.ERROR)
    with torch.device("meta"):
        model = QwenImageTransformer2DModel(**dict(qwen_config(blocks), **config))
    model = model.to(dtype=DTYPE).to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    pool = (torch.randn(POOL, generator=g, device=device) * 0.02).to(DTYPE)
    off = 0
    with torch.no_grad():
        for p in model.parameters():
            flat = p.data.view(-1)
            i = 0
            while i < flat.numel():
                k = min(flat.numel() - i, POOL - off)
                flat[i : i + k].copy_(pool[off : off + k])
                i, off = i + k, (off + k) % POOL
    return model.eval().requires_grad_(False)


def target_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """{module: (in, out)} of the LoRA-covered linears of every block."""
    return {n: s for n, s in T.linear_shapes(model).items() if n.startswith("transformer_blocks.") and n.endswith(TARGETS)}


def write_loras(shapes: dict[str, tuple[int, int]], rank: int, count: int, directory: str) -> list[str]:
    """``count`` PEFT-format files (``transformer.<module>.lora_A.weight`` + ``.alpha``), bf16.

    alpha = rank / 2: a real alpha (scale 0.5), and a power of two so diffusers' own
    alpha folding (it multiplies the bf16 factors by the scale) is exact.
    """
    paths = []
    for i in range(count):
        layers = T.random_layers(shapes, rank=rank, seed=1000 * rank + i, alpha=rank / 2, dtype=DTYPE)
        sd = T.peft_state_dict(layers, prefix="transformer.")
        paths.append(T.write_safetensors(os.path.join(directory, f"r{rank}_{i}.safetensors"), sd))
    return paths


# ---- the peer: diffusers + PEFT -----------------------------------------------------------
def peer_load(peer: nn.Module, path: str, name: str) -> None:
    """What ``QwenImagePipeline.load_lora_weights(path, adapter_name=name)`` does for the transformer.

    diffusers 0.42's Qwen-Image converter re-prefixes ``transformer.`` onto keys that already
    carry it when the file has ``.alpha`` keys ("transformer.transformer.…": the pipeline
    then finds no module). We drop the doubled prefix, only when it is there, and call the
    same two functions the pipeline calls.
    """
    from diffusers.loaders.lora_pipeline import QwenImageLoraLoaderMixin as Mixin
    import diffusers.loaders.lora_pipeline as lp

    sd = Mixin.lora_state_dict(path)
    if all(k.startswith("transformer.transformer.") for k in sd):
        sd = {k[len("transformer."):]: v for k, v in sd.items()}
    Mixin.load_lora_into_transformer(
        sd, transformer=peer, adapter_name=name, low_cpu_mem_usage=lp._LOW_CPU_MEM_USAGE_DEFAULT_LORA
    )


def peer_weight(peer: nn.Module, name: str) -> torch.Tensor:
    m = peer.get_submodule(name)
    return getattr(m, "base_layer", m).weight


def peer_resync(peer: nn.Module, ours: nn.Module, names: Sequence[str]) -> None:
    """Put our (base, bit-exact) weights back into the peer: PEFT's unfuse subtracts, so it drifts."""
    with torch.no_grad():
        for n in names:
            peer_weight(peer, n).copy_(ours.get_submodule(n).weight)


# ---- floors -------------------------------------------------------------------------------
class Floors:
    """Plain-torch lower bounds for the same bytes and shapes, with buffers allocated once."""

    def __init__(self, model: nn.Module, names: Sequence[str]):
        self.weights = [model.get_submodule(n).weight for n in names]
        self._dst = {}
        for w in self.weights:
            self._dst.setdefault(tuple(w.shape), torch.empty_like(w))
        self.copy_weights()  # first touch of the buffers (page faults) is not part of the floor
        self.shapes = [tuple(w.shape) for w in self.weights]  # (out, in)

    def copy_weights(self) -> None:
        for w in self.weights:
            self._dst[tuple(w.shape)].copy_(w)

    def mm(self, rank: int, dtype: torch.dtype, repeats: int, rows: int | None = None) -> float:
        """Median seconds of B@A (out, R)@(R, in) for every touched module, into preallocated outputs.

        With ``rows``, each distinct shape runs on a ``rows``-row slice of B and its time is
        scaled by out/rows (bf16 matmul on a CPU without bf16 units runs ~1 GFLOP/s:
        the full products would take minutes).
        """
        g = torch.Generator().manual_seed(1)
        dev = self.weights[0].device  # the products run where the weights live
        by_shape: dict[tuple[int, int], int] = {}
        for s in self.shapes:
            by_shape[s] = by_shape.get(s, 0) + 1
        total = 0.0
        for (n_out, n_in), count in by_shape.items():
            m = min(rows or n_out, n_out)
            b = torch.randn(m, rank, generator=g).to(dev, dtype)
            a = torch.randn(rank, n_in, generator=g).to(dev, dtype)
            out = torch.empty(m, n_in, dtype=dtype, device=dev)
            torch.mm(b, a, out=out)  # warm the kernel
            t = med(repeat(lambda: torch.mm(b, a, out=out), repeats))
            total += t * count * (n_out / m)
        return total


class ByteCopy:
    """Copying the given tensors' bytes into preallocated buffers."""

    def __init__(self, tensors: Sequence[torch.Tensor]):
        self.src = list(tensors)
        self.dst = [torch.empty_like(t) for t in self.src]
        self.nbytes = sum(t.numel() * t.element_size() for t in self.src)
        self()  # first touch of the buffers is not part of the floor

    def __call__(self) -> None:
        for d, s in zip(self.dst, self.src):
            d.copy_(s)


def read_files(paths: Sequence[str]) -> None:
    for p in paths:
        with open(p, "rb") as f:
            f.read()


# ---- correctness --------------------------------------------------------------------------
def fingerprint(model: nn.Module, names: Sequence[str]) -> int:
    """CRC-32 over the touched weights' bytes: equal means bit-identical (for our purposes).
    Off the CPU, position-weighted sums of the bytes computed where they live (copying tens
    of GB to the host for each check would cost more than the cells)."""
    import zlib

    crc = 0
    for n in names:
        w = model.get_submodule(n).weight.detach()
        if w.device.type == "cpu":
            crc = zlib.crc32(w.contiguous().view(torch.uint8).numpy(), crc)
        else:
            crc = zlib.crc32(repr(_device_digest(w)).encode(), crc)
    return crc


def _device_digest(w: torch.Tensor, chunk: int = 1 << 24) -> tuple[int, int]:
    """Two sums of byte x position weight (weights mod two primes): a changed byte changes
    both, two swapped bytes at least one; exact in int64 for chunks of 2^24 bytes."""
    flat = w.contiguous().view(-1).view(torch.uint8)
    s1 = torch.zeros((), dtype=torch.int64, device=w.device)
    s2 = torch.zeros((), dtype=torch.int64, device=w.device)
    for i in range(0, flat.numel(), chunk):
        x = flat[i : i + chunk].to(torch.int64) + 1
        pos = torch.arange(i, i + x.numel(), device=w.device)
        s1 += (x * (pos % 65521 + 1)).sum()
        s2 += (x * (pos % 65519 + 3)).sum()
    return int(s1), int(s2)


def compare_weights(ours: nn.Module, peer: nn.Module, names: Sequence[str], n: int, chunk: int = 256) -> dict:
    """Our merged weights against PEFT's (fused once from its base).

    ``n`` bounds the roundings between the two (ours rounds W + dW once; PEFT rounds each
    adapter's dW to bf16 and adds it in bf16; each unfuse subtracts in bf16), each at most
    half an ulp of a value up to about max|W|. A wrong scale,
    strength or target misses by a fraction of dW itself, far outside this bound.
    """
    worst, ok = 0.0, True
    for nm in names:
        a, b = ours.get_submodule(nm).weight, peer_weight(peer, nm)
        for r0 in range(0, a.shape[0], chunk):  # small chunks: the temporaries stay in cache
            x, y = a[r0 : r0 + chunk].float(), b[r0 : r0 + chunk].float()
            atol = n * 2.0**-9 * float(x.abs().max())
            d = (x - y).abs_()
            worst = max(worst, float(d.max()))
            ok = ok and bool((d <= y.abs_().mul_(n * 2.0**-8).add_(atol)).all())
    return {"ok": ok, "max_abs_diff_vs_peft": worst}


def reference_check(ours: nn.Module, base_w: torch.Tensor, name: str, terms: list) -> dict:
    """One module against fp64: ours must be the fp32 result rounded once to bf16.

    Bound per element: half an ulp of the value (2^-8 relative) plus fp32 accumulation,
    (R + 2) * 2^-24 * (|W| + |sB| @ |A|) for R products, the scale fold and the add.
    """
    ref = T.reference_merge(base_w, terms)
    mag = base_w.double().abs()
    for a, b, alpha, s in terms:
        mag += abs(s * alpha / a.shape[0]) * (b.double().abs() @ a.double().abs())
    rank = sum(a.shape[0] for a, *_ in terms)
    err = (ours.get_submodule(name).weight.double() - ref).abs()
    fp32 = (rank + 2) * 2.0**-24 * mag
    bound = (ref.abs() + fp32) * 2.0**-8 + fp32 + 1e-30
    return {"ok": bool((err <= bound).all()), "module": name, "max_err_over_bound": float((err / bound).max())}


def peer_forget_merge(peer: nn.Module, ours: nn.Module, names: Sequence[str]) -> None:
    """Untimed cleanup: mark every PEFT layer unmerged and copy our base weights back in
    (instead of an unfuse_lora, which costs as much as a fuse and leaves rounding drift)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for m in peer.modules():
        if isinstance(m, BaseTunerLayer):
            m.merged_adapters = []
    peer_resync(peer, ours, names)


def lowrank_check(ours: nn.Module, peer: nn.Module, names: Sequence[str], terms_of: Callable[[str], list]) -> dict:
    """Module outputs (ours with its runtime branch, PEFT unfused) minus the base layer's
    output, against the LoRA term computed in fp64 from the factors; relative to the size of
    that term plus the bf16 rounding of the output."""
    g = torch.Generator().manual_seed(7)
    worst_ours = worst_peer = 0.0
    for n in names:
        m = ours.get_submodule(n)
        x = torch.randn(8, m.in_features, generator=g).to(m.weight.device, DTYPE)
        with torch.no_grad():
            base = nn.functional.linear(x, m.weight, m.bias).double()
            y_ours, y_peer = m(x).double(), peer.get_submodule(n)(x).double()
        xd = x.double()
        delta = sum(s * (al / a.shape[0]) * ((xd @ a.double().T) @ b.double().T) for a, b, al, s in terms_of(n))
        scale = float(delta.abs().max()) + 2**-7 * float(y_ours.abs().max())
        worst_ours = max(worst_ours, float((y_ours - base - delta).abs().max()) / scale)
        worst_peer = max(worst_peer, float((y_peer - base - delta).abs().max()) / scale)
    return {"ok": worst_ours < 0.05, "err_vs_fp64_ours": worst_ours, "err_vs_fp64_peft": worst_peer}
