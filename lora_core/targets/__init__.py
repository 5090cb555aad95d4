"""How a composed update lands on a module.

- ``dense``:   merge ΔW into an ``nn.Linear`` in fp32, cast back once (ledger restore).
- ``lowrank``: a runtime branch y = Wx + B(Ax); W untouched, switching swaps small tensors.
- ``svdq``:    nunchaku ``SVDQW4A4Linear``: concatenate into the packed low-rank branch.
- ``awq``:     nunchaku ``AWQW4A16Linear``: no low-rank branch, so a side path.

Every target returns an undo callable that puts back the exact original tensors.
"""
