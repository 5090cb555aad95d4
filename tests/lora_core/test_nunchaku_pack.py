"""pack/unpack against ground truth produced by nunchaku's own code (../shared/fixtures)."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from lora_core.nunchaku import pack_lowrank, reorder_modulation_rows, unpack_lowrank

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
