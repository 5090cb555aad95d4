"""pack/unpack against ground truth produced by nunchaku's own code (../shared/fixtures)."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from lora_core import nunchaku as N
from lora_core.nunchaku import pack_lowrank, reorder_modulation_rows, round_up, unpack_lowrank

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "fixtures", "nunchaku_lowrank_reference.safetensors")


@pytest.fixture(scope="module")
def ref():
    if not os.path.exists(FIXTURE):
        pytest.fail(f"ground-truth fixture missing: {FIXTURE}")
    return load_file(FIXTURE)


def cases(ref):
    return sorted(k[: -len(".logical")] for k in ref if k.endswith(".logical"))


def test_fixture_has_cases(ref):
    names = cases(ref)
    assert len(names) == 12
    assert {n.split(".")[1] for n in names} == {"down", "up"}


def test_pack_matches_nunchaku_bit_exactly(ref):
    for case in cases(ref):
        down = ".down." in case
        packed = pack_lowrank(ref[case + ".logical"], down=down)
        want = ref[case + ".packed"]
        assert packed.shape == want.shape, case
        assert packed.dtype == want.dtype, case
        assert torch.equal(packed, want), case


def test_unpack_matches_nunchaku_bit_exactly(ref):
    for case in cases(ref):
        down = ".down." in case
        got = unpack_lowrank(ref[case + ".packed"], down=down)
        assert torch.equal(got, ref[case + ".unpacked"]), case


def test_round_trip_random_shapes():
    g = torch.Generator().manual_seed(1)
    for rows, cols in [(16, 16), (5, 33), (48, 130), (1, 1)]:
        for down in (True, False):
            w = torch.randn(rows, cols, generator=g).to(torch.bfloat16)
            back = unpack_lowrank(pack_lowrank(w, down=down), down=down)
            assert torch.equal(back[:rows, :cols], w)
            assert back[rows:].abs().sum() == 0 and back[:, cols:].abs().sum() == 0


def test_modulation_reorder_matches_fixture(ref):
    assert torch.equal(reorder_modulation_rows(ref["adanorm.splits6.in"]), ref["adanorm.splits6.out"])


def test_bad_packed_shape_is_an_error():
    with pytest.raises(ValueError):
        unpack_lowrank(torch.zeros(17, 16), down=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.uint8])
@pytest.mark.parametrize("down", [True, False])
def test_pack_is_the_same_permutation_for_every_element_width(dtype, down):
    """The pair-wide fast path (1-, 2- and 4-byte elements) and the plain path (8-byte)
    move every value to the same place: compare through a value-preserving cast."""
    x = torch.arange(48 * 40, dtype=torch.float64).reshape(48, 40) % 251  # exact in every dtype listed
    ref = pack_lowrank(x, down=down)
    got = pack_lowrank(x.to(dtype), down=down)
    assert torch.equal(got.double(), ref)
    assert torch.equal(unpack_lowrank(got, down=down).double(), unpack_lowrank(ref, down=down))


@pytest.mark.parametrize("down", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_packing_after_a_packed_factor_equals_packing_the_concatenation(down, dtype):
    g = torch.Generator().manual_seed(5)
    # a base of rank 32 and LoRAs of rank 16 and 5 (padded to 16), 40 inputs (padded to 48)
    base, lora, odd = (torch.randn(r, 40, generator=g).to(dtype) for r in (32, 16, 5))
    if down:  # logical (rank, in): concatenate along rows
        whole = torch.cat([base, lora, pad(odd, 16, 40)], 0)
        parts = (base, lora, odd)
    else:  # logical (out, rank): concatenate along columns
        whole = torch.cat([base.T, lora.T, pad(odd, 16, 40).T], 1)
        parts = (base.T, lora.T, odd.T)
    got = pack_lowrank(parts[1], down=down, after=pack_lowrank(parts[0], down=down))
    got = pack_lowrank(pad(parts[2], *((16, 40) if down else (40, 16))), down=down, after=got)
    assert got.shape == (48, 64)
    assert torch.equal(got, pack_lowrank(whole, down=down))
    assert torch.equal(unpack_lowrank(got, down=down)[:64, :40] if down else unpack_lowrank(got, down=down)[:40, :64],
                       whole)
    with pytest.raises(ValueError, match="cannot append"):
        pack_lowrank(parts[1], down=down, after=pack_lowrank(parts[0], down=down).to(torch.float16))
    with pytest.raises(ValueError, match="cannot append"):
        pack_lowrank(parts[1], down=down, after=torch.zeros(32, 16, dtype=dtype))


def pad(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    out = x.new_zeros(rows, cols)
    out[: x.shape[0], : x.shape[1]] = x
    return out


def _two_step(monkeypatch, fn, *args, **kw):
    """``fn`` with the precomputed index switched off (the two-step path)."""
    with monkeypatch.context() as m:
        m.setattr(N, "INDEX_BYTES", 0)
        return fn(*args, **kw)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.uint8])
@pytest.mark.parametrize("down", [True, False])
def test_index_path_is_the_two_step_permutation(monkeypatch, dtype, down):
    """The precomputed pair index and the two-step path put every value in the same place, in
    pack, in pack-after-a-base and in unpack (odd shapes padded), for 1- to 8-byte elements."""
    g = torch.Generator().manual_seed(7)
    for rows, cols in [(16, 16), (5, 33), (48, 130), (64, 3072)]:
        w = (torch.rand(rows, cols, generator=g) * 250).to(dtype)
        base = (torch.rand(round_up(cols if down else rows), 32, generator=g) * 250).to(dtype)
        for got, want in [
            (pack_lowrank(w, down=down), _two_step(monkeypatch, pack_lowrank, w, down=down)),
            (pack_lowrank(w, down=down, after=base), _two_step(monkeypatch, pack_lowrank, w, down=down, after=base)),
        ]:
            assert got.shape == want.shape and torch.equal(got, want), (rows, cols)
            assert torch.equal(unpack_lowrank(got, down=down), _two_step(monkeypatch, unpack_lowrank, got, down=down))


def test_index_cache_stays_within_its_bytes(monkeypatch):
    """Indices beyond INDEX_BYTES are dropped least recently used first; a shape whose index
    alone is larger is packed by the two steps and not kept; results stay exact throughout."""
    monkeypatch.setattr(N, "_indices", N._Indices())
    monkeypatch.setattr(N, "INDEX_BYTES", 3 * 16 * 256 * 2)  # room for three (16, 256)-pair indices
    g = torch.Generator().manual_seed(8)
    for cols in (256, 272, 288, 304, 256):
        w = torch.randn(16, cols, generator=g)
        back = unpack_lowrank(pack_lowrank(w, down=True), down=True)
        assert torch.equal(back, w)
        assert N._indices.bytes <= N.INDEX_BYTES
    kept = set(N._indices._kept)
    assert (16, 256, True, False, "cpu") in kept  # used last: kept
    assert (16, 272, True, False, "cpu") not in kept  # least recently used: dropped
    big = torch.randn(64, 4096, generator=g)  # an index of 512 KiB: larger than the whole budget
    assert torch.equal(unpack_lowrank(pack_lowrank(big, down=False), down=False), big)
    assert set(N._indices._kept) <= kept and N._indices.bytes <= N.INDEX_BYTES
