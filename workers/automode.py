"""``lora_mode: auto`` for dense layers: merge or a runtime low-rank branch, by measured cost.

Holding one composition for a run of ``n`` images costs

    merge:    s_merge + n * r            (a slow switch, no cost per image)
    lowrank:  s_low   + n * (r + delta)  (a cheap switch, ``delta`` more per image)

so the branch wins when ``s_merge - s_low > n * delta``. Every term is measured on the
worker itself: switch seconds per mode (``ComposedModel``'s clock), ``delta`` by timing
the branches' own work while they run, ``r`` and ``n`` (images per held composition) from
the renders. Until both modes have been seen, merge is used, and the branch is tried once
when a merge switch is a noticeable share of a run (``explore_share``). A small margin
(``hysteresis``, a share of a run's cost) keeps noise from flipping the mode back and forth.

SVDQ layers (nunchaku) always concatenate; ``auto`` only decides the dense layers. Merge
and branch round differently, so ``auto`` can change pixels by rounding between two
renders of one job: use ``merge`` or ``lowrank`` when bytes must repeat exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Ewma:
    weight: float = 0.3
    value: float | None = None
    samples: int = 0

    def add(self, x: float) -> None:
        self.value = x if self.value is None else (1 - self.weight) * self.value + self.weight * x
        self.samples += 1


@dataclass(frozen=True)
class Choice:
    mode: str
    reason: str


def choose(s_merge: float | None, s_low: float | None, delta: float | None, n: float | None, r: float | None,
           current: str = "merge", explore_share: float = 0.05, hysteresis: float = 0.02) -> Choice:
    """The dense mode for the next composition from measured costs (seconds; None: unknown)."""
    if s_merge is None or n is None or r is None:
        return Choice("merge", "no measurements yet: merge (no cost per image)")
    run = s_merge + n * r
    if s_low is None or delta is None:
        share = s_merge / run if run > 0 else 0.0
        if share >= explore_share:
            return Choice("lowrank", f"trying the branch once: a merge switch is {share:.0%} of a run")
        return Choice("merge", f"a merge switch is {share:.0%} of a run: not worth a branch")
    gain = s_merge - s_low - n * delta  # seconds a run saves with the branch
    margin = hysteresis * run
    want = "lowrank" if gain > 0 else "merge"
    if want != current and abs(gain) <= margin:
        want = current
    what = (f"merge switch {s_merge:.3g}s, branch switch {s_low:.3g}s, branch +{delta:.3g}s/image, "
            f"{n:.3g} images per composition: the branch {'saves' if gain > 0 else 'costs'} {abs(gain):.3g}s a run")
    return Choice(want, what)


@dataclass
class AutoMode:
    """The measurements and the current choice of one ComposedModel."""

    explore_share: float = 0.05
    hysteresis: float = 0.02
    switch_s: dict = field(default_factory=lambda: {"merge": Ewma(), "lowrank": Ewma()})
    delta_s: Ewma = field(default_factory=Ewma)  # branch seconds per image
    render_s: Ewma = field(default_factory=Ewma)  # seconds per image, whatever the mode
    images_per_run: Ewma = field(default_factory=Ewma)
    run_images: int = 0  # images rendered at the composition held now
    choice: Choice = field(default_factory=lambda: Choice("merge", "no measurements yet: merge (no cost per image)"))

    def next_mode(self) -> Choice:
        """Called before each switch: closes the run at the held composition, then chooses."""
        if self.run_images:
            self.images_per_run.add(self.run_images)
        self.run_images = 0
        self.choice = choose(self.switch_s["merge"].value, self.switch_s["lowrank"].value, self.delta_s.value,
                             self.images_per_run.value, self.render_s.value, self.choice.mode,
                             self.explore_share, self.hysteresis)
        return self.choice

    def switched(self, mode: str, seconds: float) -> None:
        self.switch_s[mode].add(seconds)

    def rendered(self, images: int, seconds: float, branch_seconds: float | None) -> None:
        if images <= 0:
            return
        self.run_images += images
        per = seconds / images
        if branch_seconds is not None:
            self.delta_s.add(branch_seconds / images)
            per -= branch_seconds / images  # r is the cost without the branch
        self.render_s.add(per)

    def as_dict(self) -> dict:
        return {"mode": self.choice.mode, "reason": self.choice.reason,
                "merge_switch_s": self.switch_s["merge"].value, "lowrank_switch_s": self.switch_s["lowrank"].value,
                "branch_s_per_image": self.delta_s.value, "render_s_per_image": self.render_s.value,
                "images_per_composition": self.images_per_run.value}
