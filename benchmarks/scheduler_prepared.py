"""What a worker holds, priced tier by tier: the policy that sees the compositions a worker
keeps prepared (its low-rank branch cache) against the same policy blind to them.

Command: ``python -m benchmarks.scheduler_prepared [--json] [--write-results]``

Workload (``farm.scheduler.sim_fair.make_runs_workload``): 2000 jobs in runs of 5-200 jobs
(log-uniform) over 1-6 compositions each, drawn from one Zipf(alpha) popularity over 100
compositions shared by every run, arriving as a Poisson process at 1.3x what the farm
renders; one submitter. Farm (``farm/scheduler/sim.py``): render 1 s, each worker keeps its 4
most recent compositions prepared (``FarmModel.prepared``; a switch back to one costs
``swap_s`` = 0.05 s and composes nothing, once its adapters not in memory are read), swept
over alpha 0.6/0.9/1.2 x compose/render 1/5/20 x workers 2/4/8/16. Both policies are ``AffinityScheduler()``; the blind one is shown
every worker with an empty ``prepared`` set (it still prices adapters in memory and on disk).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from typing import Any, Sequence

from farm.scheduler.affinity import AffinityScheduler
from farm.scheduler.sim import FarmModel, simulate
from farm.scheduler.sim_fair import make_runs_workload

TITLE = "Scheduler: what a worker holds (simulation)"
GRID = [(a, c, k) for a in (0.6, 0.9, 1.2) for c in (1, 5, 20) for k in (2, 4, 8, 16)]
PREPARED, SWAP_S, LOAD = 4, 0.05, 1.3


class Blind(AffinityScheduler):
    """``AffinityScheduler`` shown no prepared compositions: the peer without the tier."""

    name = "affinity (tier-blind)"

    def assign(self, workers, now):
        return super().assign([dataclasses.replace(w, prepared=frozenset()) for w in workers], now)

    def prefetch(self, workers):
        return super().prefetch([dataclasses.replace(w, prepared=frozenset()) for w in workers])


def one(alpha: float, compose: float, workers: int, seed: int = 0, jobs: int = 2000) -> dict[str, Any]:
    span = jobs / (workers * LOAD)  # seconds over which the runs arrive: 1.3x the farm's rate
    work = make_runs_workload(jobs, 100, alpha, seed, submitters=("a",), span_s=span)
    farm = FarmModel(workers, compose_s=compose, render_s=1.0, prepared=PREPARED, swap_s=SWAP_S)
    seen, blind = simulate(AffinityScheduler(), work, farm), simulate(Blind(), work, farm)
    return {"alpha": alpha, "compose": compose, "workers": workers,
            "tier": seen.as_dict(), "blind": blind.as_dict(),
            "recomp_x_blind": seen.recompositions / max(1, blind.recompositions),
            "makespan_x_blind": seen.makespan / blind.makespan}


def sweep(seed: int = 0) -> list[dict[str, Any]]:
    return [one(a, c, k, seed) for a, c, k in GRID]


def table(rows: Sequence[dict[str, Any]], command: str) -> str:
    rec = [r["recomp_x_blind"] for r in rows]
    mk = [r["makespan_x_blind"] for r in rows]
    lines = [f"Command: `{command}`", "", __doc__.split("\n\n", 2)[2].strip().replace("\n", " "), "",
             f"Over the {len(rows)} configurations: recompositions with the tier / blind: median "
             f"{statistics.median(rec):.3f}, worst {max(rec):.3f}, best {min(rec):.3f}; makespan: median "
             f"{statistics.median(mk):.3f}, worst {max(mk):.3f}; fewer recompositions in "
             f"{sum(r['tier']['recompositions'] < r['blind']['recompositions'] for r in rows)}, more in "
             f"{sum(r['tier']['recompositions'] > r['blind']['recompositions'] for r in rows)}.", "",
             "| alpha | compose/render | workers | recomp. tier / blind | swaps tier / blind | makespan tier / blind (s) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        t, b = r["tier"], r["blind"]
        lines.append(f"| {r['alpha']} | {r['compose']:g} | {r['workers']} | {t['recompositions']} / {b['recompositions']} "
                     f"| {t['swaps']} / {b['swaps']} | {t['makespan']:.0f} / {b['makespan']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true")
    p.add_argument("--write-results", action="store_true", help="rewrite this section of benchmarks/RESULTS.md")
    a = p.parse_args(argv)
    rows = sweep()
    text = table(rows, "python -m benchmarks.scheduler_prepared")
    print(json.dumps(rows, indent=1) if a.json else text)
    if a.write_results:
        from benchmarks.common import replace_section

        replace_section(TITLE, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
