"""nunchaku ``SVDQW4A4Linear``: the LoRA is concatenated into the packed low-rank branch.

The module keeps ``proj_down`` packed as (in_pad, rank_pad) and ``proj_up`` as
(out_pad, rank_pad). We unpack the base branch once per module (memoized on the original
parameter), append A to down and scale·B to up along the rank axis, zero-pad the rank to a
multiple of 16, repack, and swap the parameters in. The original Parameter objects are
kept and swapped back on restore, so restore is exact and costs nothing.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn

from ..compose import ModuleUpdate
from ..errors import NonFiniteError, StaleBranchError
from ..nunchaku import BASE_ATTR, base_of, pack_lowrank, pad_to, round_up, unpack_lowrank
from .dense import all_finite
from .ledger import Ledger

# id(original proj_down / proj_up parameter) -> (weakref to it, its version, unpacked base).
# Tensors compare elementwise, so a WeakKeyDictionary cannot hold them; the weakref and the
# in-place version counter make sure a reused id or an edited tensor is never served stale.
_unpacked: dict[int, tuple[weakref.ref, int, torch.Tensor]] = {}


def _base(param: torch.Tensor, down: bool, rank: int) -> torch.Tensor:
    hit = _unpacked.get(id(param))
    if hit is not None and hit[0]() is param and hit[1] == param._version:
        return hit[2]
    full = unpack_lowrank(param.data, down=down)
    base = full[:rank] if down else full[:, :rank]
    key = id(param)
    _unpacked[key] = (weakref.ref(param, lambda _r, key=key: _unpacked.pop(key, None)), param._version, base)
    return base


@dataclass(frozen=True, eq=False)
class Packed:
    """A composition's packed branch for one module, built against its base parameters."""

    base_down: torch.Tensor
    base_up: torch.Tensor
    down: torch.Tensor
    up: torch.Tensor
    rank: int
    base_versions: tuple[int, int] = (0, 0)  # in-place edits of the base make it stale

    def fits(self, base_down: torch.Tensor, base_up: torch.Tensor) -> bool:
        return (self.base_down is base_down and self.base_up is base_up
                and self.base_versions == (base_down._version, base_up._version))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.down, self.up))


def concat_branch(on: tuple[torch.Tensor, torch.Tensor, int], update: ModuleUpdate) -> tuple[torch.Tensor, torch.Tensor, int]:
    """New packed (proj_down, proj_up) and the new padded rank: the LoRA appended to the
    packed branch ``on`` = (proj_down, proj_up, rank); nothing is touched.

    When that rank is a multiple of 16 (nunchaku's checkpoints: 32, 128) only the LoRA is
    packed, its tiles written after the packed tiles (``pack_lowrank(..., after=)``).
    """
    base_down, base_up, rank = on
    dtype = base_down.dtype
    in_pad, out_pad = base_down.shape[0], base_up.shape[0]
    if rank % 16 == 0 and base_down.shape[1] == rank and base_up.shape[1] == rank:
        r = round_up(update.rank)
        a = update.A.to(device=base_down.device, dtype=dtype)
        b = update.B.to(device=base_up.device, dtype=dtype)
        down = pack_lowrank(pad_to(a, r, in_pad), down=True, after=base_down.data)
        up = pack_lowrank(pad_to(b, out_pad, r), down=False, after=base_up.data)
        return down, up, rank + r
    down0 = _base(base_down, True, rank)  # (rank, in_pad)
    up0 = _base(base_up, False, rank)  # (out_pad, rank)
    a = update.A.to(device=down0.device, dtype=dtype)
    b = update.B.to(device=up0.device, dtype=dtype)
    new_rank = round_up(rank + a.shape[0])
    down = down0.new_zeros(new_rank, down0.shape[1])
    down[:rank] = down0
    down[rank : rank + a.shape[0], : a.shape[1]] = a
    up = up0.new_zeros(up0.shape[0], new_rank)
    up[:, :rank] = up0
    up[: b.shape[0], rank : rank + b.shape[1]] = b
    return pack_lowrank(down, down=True), pack_lowrank(up, down=False), new_rank


def pack_update(module: nn.Module, update: ModuleUpdate,
                on: tuple[torch.Tensor, torch.Tensor, int] | None = None) -> Packed:
    """Check the update and build its packed branch on ``on`` (default: the module's base,
    whatever composition it holds now); the module is not touched."""
    if not (all_finite(update.B) and all_finite(update.A)):
        raise NonFiniteError(f"LoRA update for {update.module!r} is not finite; nothing was changed")
    on = on or base_of(module)
    down, up, rank = concat_branch(on, update)
    return Packed(on[0], on[1], down, up, rank, (on[0]._version, on[1]._version))


def apply_svdq(module: nn.Module, update: ModuleUpdate, ledger: Ledger) -> None:
    """Swap the composition's packed branch in: the one ``update`` carries when it was built
    on what the module holds now (``api.prepare`` builds on the base, which ``switch``
    restores first), else a new one built on what it holds (so two ``apply`` calls stack)."""
    held = (module.proj_down, module.proj_up, int(module.rank))
    packed = update.packed
    if not (isinstance(packed, Packed) and packed.fits(held[0], held[1])):
        if update.A is None:
            raise StaleBranchError(f"the prepared branch for {update.module!r} was packed against another base "
                                   "than the module holds now; plan and prepare it again")
        packed = pack_update(module, update, on=held)
    had_base = BASE_ATTR in module.__dict__
    module.__dict__.setdefault(BASE_ATTR, held)
    old = (module.proj_down, module.proj_up, module.rank)

    def undo(module=module, old=old) -> None:
        module.proj_down, module.proj_up, module.rank = old
        if not had_base:  # back at the base: its live parameters are the truth again
            module.__dict__.pop(BASE_ATTR, None)

    module.proj_down = nn.Parameter(packed.down, requires_grad=False)
    module.proj_up = nn.Parameter(packed.up, requires_grad=False)
    module.rank = packed.rank
    ledger.record(update.module, undo)
