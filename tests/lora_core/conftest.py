from __future__ import annotations

import pytest
import torch

# A small Qwen-Image transformer with the real module names (independent of workers/).
SMALL_QWEN = dict(
    patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=24, axes_dims_rope=(4, 6, 6),
)


@pytest.fixture
def qwen():
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(**SMALL_QWEN).eval()
    return model


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(model: torch.nn.Module, snap: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert set(now) == set(snap)
    for k, v in snap.items():
        assert now[k].dtype == v.dtype and torch.equal(now[k], v), f"{k} changed"
    for name, m in model.named_modules():
        assert not m._forward_hooks, f"hook left on {name}"
