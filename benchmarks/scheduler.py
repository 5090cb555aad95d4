"""Scheduler benchmark: our affinity policy against the baselines, in simulation.

    python -m benchmarks.scheduler --jobs N --compositions M --workers K --alpha A \\
        --compose-cost C --render-cost R --seed S --json
    python -m benchmarks.scheduler --sweep [--no-write]
    python -m benchmarks.scheduler --fair-sweep [--no-write]

One run prints one JSON object: per policy (``affinity``, ``fifo``, ``least_loaded``,
``serve_multiplex``, and ``affinity_greedy``: ours without the batch plan, an ablation) its
``makespan``, ``recompositions`` and ``p95_wait`` (seconds from arrival to the job's start
on its worker), plus the workload's ``lower_bound_makespan``
and ``lower_bound_recompositions`` (see ``farm.scheduler.sim_bounds.lower_bounds``).

``--sweep`` runs alpha 0.6/0.9/1.2 x compose/render 1/5/20 x workers 2/4/8/16 on the
workloads in ``SCENARIOS`` (batch with 100 compositions, batch with 20, bursty with 100;
batch with 20 where the policy learns the costs from 1 s priors as the real dispatcher
does; batch with 20 and bursty with 100 with mixed job sizes), measures the
cost of one ``assign`` decision with 10,000 jobs queued, writes
``benchmarks/scheduler_sweep.png`` and replaces the "## Scheduler (simulation)" section
of ``benchmarks/RESULTS.md``.

``--fair-sweep`` runs the workloads with several submitters and run arrivals
(``benchmarks/scheduler_fair.py``: fairness, a small run behind a large one, the cost of
fairness against ``fair=False``) in one process, writes ``benchmarks/scheduler_fair.png``
and replaces the "## Scheduler: fair share and run arrivals (simulation)" section.
"""
from __future__ import annotations

from benchmarks.common import machine, write_section

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from collections import Counter
from typing import Any

from farm.scheduler.affinity import AffinityScheduler
from farm.scheduler.baselines import POLICIES, make
from farm.scheduler.queue import JobQueue
from farm.scheduler.sim import FarmModel, make_workload, simulate
from farm.scheduler.sim_bounds import lower_bounds, recompositions_needed
from farm.scheduler.types import WorkerView

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "RESULTS.md")
PLOT = os.path.join(HERE, "scheduler_sweep.png")
SECTION = "## Scheduler (simulation)"
BASELINES = ("fifo", "least_loaded", "serve_multiplex")
SCENARIOS = {  # name -> (compositions, arrival, prior: None = the policy sees the true costs, mixed sizes)
    "batch, 100 compositions": (100, "batch", None, False),
    "batch, 20 compositions": (20, "batch", None, False),
    "bursty, 100 compositions": (100, "bursty", None, False),
    "batch, 20 compositions, costs learned from 1 s priors": (20, "batch", 1.0, False),
    "batch, 20 compositions, mixed job sizes": (20, "batch", None, True),
    "bursty, 100 compositions, mixed job sizes": (100, "bursty", None, True),
}
TARGETS = {"makespan": 1.15, "recompositions": 1.25, "speedup": 1.2}
class _EveryComposition(JobQueue):
    def largest(self, exclude, limit):
        return super().largest(exclude, self.compositions())


class ToldArrivals(AffinityScheduler):
    """An ablation for bursty arrivals, not a policy a farm could run: ours, told which
    compositions have received their last job (knowledge of the future), serves those
    first in the greedy rules, before any composition more jobs will come for."""

    def __init__(self, jobs: list, **kw: Any) -> None:
        super().__init__(**kw)
        self._coming = Counter(j.routing_key for j in jobs)  # jobs not yet arrived, per composition
        self.queue = _EveryComposition()  # rank them all, not only the largest few

    def submit(self, jobs) -> None:
        jobs = list(jobs)
        self._coming.subtract(j.routing_key for j in jobs)
        super().submit(jobs)

    def _rank(self, key: str, clear_s: float) -> Any:
        return (self._coming[key] > 0, -clear_s)


class _Deferring(_EveryComposition):
    skip: frozenset = frozenset()

    def largest(self, exclude, limit):
        return [e for e in super().largest(exclude, limit) if e[-1] not in self.skip]


class ToldArrivalsDeferring(ToldArrivals):
    """A witness for bursty arrivals, not a policy a farm could run: told every arrival,
    ours also holds back a composition nobody holds while more of its jobs will come
    (smallest first, as long as the queued work so held back is at most ``budget_s`` per
    worker); it is composed once its last job has arrived, or once it no longer fits the
    budget. What schedules that knowing the future allows look like."""

    BUDGETS = (5.0, 20.0, 50.0, 100.0, 200.0)  # x render seconds; ``told_deferring`` keeps the best

    def __init__(self, jobs: list, budget_s: float, **kw: Any) -> None:
        super().__init__(jobs, **kw)
        self.budget_s = budget_s
        self.queue = _Deferring()

    def _switch(self, slots, greedy, holders, out) -> None:
        rate = sum(s.view.render_cost_s for s in slots) / len(slots)
        waiting = sorted((work * rate, key) for key, _, work in self.queue.sizes()
                         if not holders[key] and self._coming[key] > 0)
        skip, held_back = set(), 0.0
        for seconds, key in waiting:
            if held_back + seconds > self.budget_s * len(slots):
                break
            held_back += seconds
            skip.add(key)
        self.queue.skip = frozenset(skip)
        try:
            super()._switch(slots, greedy, holders, out)
        finally:
            self.queue.skip = frozenset()


def told_deferring(work: list, farm: FarmModel, makespan_target: float, **kw: Any) -> dict[str, Any]:
    """The best ``ToldArrivalsDeferring`` over its budgets: fewest recompositions among
    those within ``makespan_target``, else the shortest makespan."""
    runs = [dict(simulate(ToldArrivalsDeferring(work, b * farm.render_s, **kw), work, farm).as_dict(), budget_renders=b)
            for b in ToldArrivalsDeferring.BUDGETS]
    fast = [r for r in runs if r["makespan"] <= makespan_target]
    return min(fast, key=lambda r: (r["recompositions"], r["makespan"])) if fast else min(runs, key=lambda r: r["makespan"])


def run_one(jobs: int, compositions: int, workers: int, alpha: float, compose: float, render: float,
            seed: int, *, fetch: float | None = None, capacity: int = 2, arrival: str = "batch",
            prior: float | None = None, mixed: bool = False) -> dict[str, Any]:
    """Every policy on one workload; the JSON object the CLI prints."""
    farm = FarmModel(workers, compose, render, fetch_s=fetch, capacity=capacity, prior_s=prior)
    span = 0.8 * (jobs * render + compositions * compose) / workers  # bursts keep the farm ~80% busy
    work = make_workload(jobs, compositions, alpha, seed, arrival=arrival, span_s=span, mixed_sizes=mixed)
    out: dict[str, Any] = {name: simulate(make(name), work, farm).as_dict() for name in POLICIES}
    out["affinity_greedy"] = simulate(AffinityScheduler(follow_plan=False), work, farm).as_dict()  # ablation: no plan
    if arrival == "bursty":  # ablation: told which compositions' jobs have all arrived
        out["affinity_told_arrivals"] = simulate(ToldArrivals(work), work, farm).as_dict()
    bounds = lower_bounds(work, farm)
    if arrival == "bursty":  # witness: told every arrival, and holding compositions back
        out["affinity_told_deferring"] = told_deferring(work, farm, TARGETS["makespan"] * bounds["makespan"])
    if mixed:  # ablation: the plan counts every job as one
        out["affinity_unweighted"] = simulate(AffinityScheduler(weigh_jobs=False), work, farm).as_dict()
    out["lower_bound_makespan"] = round(bounds["makespan"], 3)
    out["lower_bound_recompositions"] = bounds["recompositions"]
    out["lp_compositions"] = round(bounds["lp_compositions"], 1)
    # compositions any schedule needs to finish within the makespan target (see sim_bounds.recompositions_needed)
    out["recompositions_needed_at_makespan_target"] = recompositions_needed(
        work, farm, TARGETS["makespan"] * bounds["makespan"])
    out["params"] = {
        "jobs": jobs, "compositions": compositions, "workers": workers, "alpha": alpha,
        "compose_cost": compose, "render_cost": render, "fetch_cost": farm.fetch,
        "load_cost": farm.load, "capacity": capacity, "arrival": arrival, "seed": seed, "prior": prior,
        "mixed_sizes": mixed,
    }
    return out


def _sweep_task(args: tuple) -> dict[str, Any]:
    scenario, alpha, ratio, workers, seed = args
    compositions, arrival, prior, mixed = SCENARIOS[scenario]
    r = run_one(2000, compositions, workers, alpha, float(ratio), 1.0, seed, arrival=arrival, prior=prior,
                mixed=mixed)
    r["scenario"] = scenario
    return r


def sweep(seed: int = 0, procs: int = 2) -> list[dict[str, Any]]:
    grid = [(s, a, c, k, seed) for s in SCENARIOS for a in (0.6, 0.9, 1.2) for c in (1, 5, 20) for k in (2, 4, 8, 16)]
    with mp.get_context("spawn").Pool(procs) as pool:
        return pool.map(_sweep_task, grid, chunksize=1)


def summarize(r: dict[str, Any]) -> dict[str, Any]:
    a = r["affinity"]
    best = min(BASELINES, key=lambda n: r[n]["makespan"])
    return {
        "makespan_x_lb": a["makespan"] / r["lower_bound_makespan"],
        "recomp_x_lb": a["recompositions"] / r["lower_bound_recompositions"],
        # can any schedule meet both the makespan and the recomposition targets here?
        "jointly_feasible": r["recompositions_needed_at_makespan_target"]
        <= TARGETS["recompositions"] * r["lower_bound_recompositions"],
        "best": best, "speedup": r[best]["makespan"] / a["makespan"],
        "greedy_met": _both_met(r, "affinity_greedy"),
        "unweighted_met": _both_met(r, "affinity_unweighted") if "affinity_unweighted" in r else None,
        "told_recomp_x_lb": (r["affinity_told_arrivals"]["recompositions"] / r["lower_bound_recompositions"]
                             if "affinity_told_arrivals" in r else None),
        "told_deferring_met": _both_met(r, "affinity_told_deferring") if "affinity_told_deferring" in r else None,
        "told_deferring_recomp_x_lb": (r["affinity_told_deferring"]["recompositions"] / r["lower_bound_recompositions"]
                                       if "affinity_told_deferring" in r else None),
    }


def _both_met(r: dict[str, Any], policy: str) -> bool:
    """The makespan and recomposition targets, for one policy's result in a run."""
    return (r[policy]["makespan"] / r["lower_bound_makespan"] <= TARGETS["makespan"]
            and r[policy]["recompositions"] / r["lower_bound_recompositions"] <= TARGETS["recompositions"])


def decision_cost(queued: int = 10_000, workers: int = 16, compositions: int = 200, steps: int = 4000) -> dict[str, float]:
    """Microseconds per assigned job with ``queued`` jobs waiting, one finish per call."""
    work = make_workload(queued + steps * 2 + 64, compositions, 1.0, 1)
    comp_of = {j.job_id: j.routing_key for j in work}
    feed = iter(work)
    policy = AffinityScheduler()
    policy.submit(next(feed) for _ in range(queued))
    state = {f"w{i}": [None, 0, []] for i in range(workers)}  # composition, inflight, running ids

    def views() -> list[WorkerView]:
        return [WorkerView(w, f"n{i // 4}", c, frozenset(), frozenset(), n, 2, 5.0, 1.0)
                for i, (w, (c, n, _)) in enumerate(state.items())]

    t0 = time.perf_counter()
    first = policy.assign(views(), 0.0)  # the queued jobs are a batch: this call plans it
    plan_ms = (time.perf_counter() - t0) * 1e3
    for job_id, wid in first:
        state[wid][1] += 1
        state[wid][2].append(job_id)
    calls, assigned, spent = [], 0, 0.0
    for step in range(1, steps):
        v = views()
        t0 = time.perf_counter()
        pairs = policy.assign(v, float(step))
        dt = time.perf_counter() - t0
        spent, assigned = spent + dt, assigned + len(pairs)
        calls.append(dt)
        for job_id, wid in pairs:
            state[wid][1] += 1
            state[wid][2].append(job_id)
        policy.submit(next(feed) for _ in range(len(pairs)))  # keep the queue at ``queued``
        busy = [w for w, s in state.items() if s[2]]
        w = busy[step % len(busy)]
        done = state[w][2].pop(0)
        state[w][1] -= 1
        state[w][0] = comp_of[done]
        policy.done(done)
    calls.sort()
    return {
        "queued": queued, "workers": workers, "compositions": compositions,
        "us_per_job": round(spent / max(assigned, 1) * 1e6, 1),
        "us_per_call_median": round(statistics.median(calls) * 1e6, 1),
        "us_per_call_p99": round(calls[int(len(calls) * 0.99)] * 1e6, 1),
        "first_call_ms": round(plan_ms, 1), "plans": policy.plans_made,
    }


def plot(rows: list[dict[str, Any]], path: str = PLOT) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(SCENARIOS), 2, figsize=(14, 4 * len(SCENARIOS)), squeeze=False)
    for row, scenario in enumerate(SCENARIOS):
        rs = [r for r in rows if r["scenario"] == scenario]
        labels = [f"a{r['params']['alpha']} c{r['params']['compose_cost']:g} k{r['params']['workers']}" for r in rs]
        for col, (metric, bound) in enumerate((("makespan", "lower_bound_makespan"),
                                                ("recompositions", "lower_bound_recompositions"))):
            ax = axes[row][col]
            for name in (*POLICIES, "affinity_greedy"):
                ax.plot(range(len(rs)), [r[name][metric] / r[bound] for r in rs], marker="o", ms=3,
                        lw=2 if name == "affinity" else 1, ls=":" if name == "affinity_greedy" else "-",
                        label="affinity without the plan" if name == "affinity_greedy" else name)
            target = TARGETS["makespan" if col == 0 else "recompositions"]
            ax.axhline(target, color="grey", ls="--", lw=0.8, label=f"target {target}x")
            ax.set_yscale("log")
            ax.set_title(f"{scenario}: {metric} / lower bound")
            ax.set_xticks(range(len(rs)), labels, rotation=90, fontsize=6)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle("2000 jobs, render 1 s; x: Zipf alpha, compose s (= compose/render), workers")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))  # room for the title
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(rows: list[dict[str, Any]], costs: list[dict[str, float]], command: str, host: str,
           seconds: float, write_plot: bool = True) -> tuple[str, dict[str, Any]]:
    """The RESULTS.md section and a JSON summary of the sweep."""
    if write_plot:
        plot(rows)
    p0 = rows[0]["params"]
    lines = [
        SECTION, "",
        f"Command: `{command}` ({seconds:.0f} s)  ",
        f"Machine: {host}  ",
        f"Workload: {p0['jobs']} jobs, render {p0['render_cost']:g} s, remote fetch {p0['fetch_cost']:g} s and "
        f"disk load {p0['load_cost']:g} s per adapter, 1-3 adapters per composition, capacity "
        f"{p0['capacity']} per worker, 4 workers per node, seed {p0['seed']}. Simulated by "
        "`farm/scheduler/sim.py` driving the real policy objects; bounds from `farm.scheduler.sim_bounds.lower_bounds`. "
        "Plot: `benchmarks/scheduler_sweep.png`. Targets: affinity makespan <= "
        f"{TARGETS['makespan']}x its lower bound, recompositions <= {TARGETS['recompositions']}x theirs, "
        f">= {TARGETS['speedup']}x faster than the best baseline.", "",
        "| workload | configs | all 3 targets met | makespan / recomp. / speedup target met | "
        "makespan + recomp. targets reachable together | missed where reachable | "
        "worst makespan/LB | worst recomp./LB | speedup min / median | "
        "makespan + recomp. met without the plan (`follow_plan=False`) | ... without job weights (`weigh_jobs=False`) | "
        "mean recomp./LB [told which compositions' jobs have all arrived] | "
        "makespan + recomp. met by a schedule told every arrival that holds compositions back [its mean recomp./LB] |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    summary: dict[str, Any] = {}
    for scenario in SCENARIOS:
        ss = [summarize(r) for r in rows if r["scenario"] == scenario]
        ok = [(s["makespan_x_lb"] <= TARGETS["makespan"], s["recomp_x_lb"] <= TARGETS["recompositions"],
               s["speedup"] >= TARGETS["speedup"]) for s in ss]
        met = sum(all(o) for o in ok)
        each = " / ".join(str(sum(o[i] for o in ok)) for i in range(3))
        feasible = sum(s["jointly_feasible"] for s in ss)
        missed = sum(s["jointly_feasible"] and not all(o) for s, o in zip(ss, ok))
        summary[scenario] = {
            "configs": len(ss), "targets_met": met, "met_makespan_recomp_speedup": each,
            "jointly_feasible": feasible, "missed_where_feasible": missed,
            "worst_makespan_x_lb": round(max(s["makespan_x_lb"] for s in ss), 3),
            "worst_recomp_x_lb": round(max(s["recomp_x_lb"] for s in ss), 3),
            "min_speedup": round(min(s["speedup"] for s in ss), 2),
            "median_speedup": round(statistics.median(s["speedup"] for s in ss), 2),
            "met_without_plan": sum(s["greedy_met"] for s in ss),
            "met_without_weights": None if ss[0]["unweighted_met"] is None else sum(s["unweighted_met"] for s in ss),
            "mean_recomp_x_lb": round(statistics.mean(s["recomp_x_lb"] for s in ss), 2),
            "told_mean_recomp_x_lb": (None if ss[0]["told_recomp_x_lb"] is None
                                      else round(statistics.mean(s["told_recomp_x_lb"] for s in ss), 2)),
            "met_told_deferring": (None if ss[0]["told_deferring_met"] is None
                                   else sum(s["told_deferring_met"] for s in ss)),
            "told_deferring_mean_recomp_x_lb": (None if ss[0]["told_deferring_recomp_x_lb"] is None else round(
                statistics.mean(s["told_deferring_recomp_x_lb"] for s in ss), 2)),
        }
        m = summary[scenario]
        lines.append(f"| {scenario} | {len(ss)} | {met} | {each} | {feasible} | {missed} | "
                     f"{m['worst_makespan_x_lb']} | {m['worst_recomp_x_lb']} | "
                     f"{m['min_speedup']} / {m['median_speedup']} | {m['met_without_plan']} | "
                     f"{'-' if m['met_without_weights'] is None else m['met_without_weights']} | "
                     f"{m['mean_recomp_x_lb']}" + ("" if m["told_mean_recomp_x_lb"] is None
                                                   else f" [{m['told_mean_recomp_x_lb']}]") + " | "
                     + ("- |" if m["met_told_deferring"] is None
                        else f"{m['met_told_deferring']} [{m['told_deferring_mean_recomp_x_lb']}] |"))
    lines += ["", "Cost of one `AffinityScheduler.assign` (16 workers, capacity 2): the first call plans the "
              "10,000 queued jobs as a batch; then one job finishes and one arrives per call (arrivals while a "
              "plan runs: the greedy rules), queue held at 10,000 jobs:", "",
              "| compositions queued | first call (plans the batch), ms | us per assigned job after | "
              "us per call, median | p99 |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {c['compositions']} | {c['first_call_ms']} | {c['us_per_job']} | {c['us_per_call_median']} | "
              f"{c['us_per_call_p99']} |" for c in costs]
    summary["decision_cost"] = costs
    for scenario in SCENARIOS:
        lines += ["", f"<details><summary>{scenario}: every configuration</summary>", "",
                  "| alpha | compose/render | workers | LB makespan | affinity makespan (xLB) | recomp. (xLB) "
                  "[LP] {needed at the makespan target} | p95 wait | best baseline | its makespan | speedup | "
                  "baselines' recomp. |",
                  "|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---|"]
        for r in (r for r in rows if r["scenario"] == scenario):
            p, a, s = r["params"], r["affinity"], summarize(r)
            lines.append(
                f"| {p['alpha']} | {p['compose_cost'] / p['render_cost']:g} | {p['workers']} | "
                f"{r['lower_bound_makespan']:.1f} | {a['makespan']:.1f} ({s['makespan_x_lb']:.3f}) | "
                f"{a['recompositions']} ({s['recomp_x_lb']:.2f}) [{r['lp_compositions']:.0f}] "
                f"{{{r['recompositions_needed_at_makespan_target']:.0f}}} | {a['p95_wait']:.1f} | "
                f"{s['best']} | {r[s['best']]['makespan']:.1f} | {s['speedup']:.2f} | "
                + " / ".join(str(r[n]["recompositions"]) for n in BASELINES) + " |")
        lines += ["", "</details>"]
    return "\n".join(lines) + "\n", summary


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--jobs", type=int, default=2000)
    p.add_argument("--compositions", type=int, default=100)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--alpha", type=float, default=1.0, help="Zipf exponent of composition popularity")
    p.add_argument("--compose-cost", type=float, default=5.0, help="seconds per recomposition")
    p.add_argument("--render-cost", type=float, default=1.0, help="seconds per job")
    p.add_argument("--fetch-cost", type=float, default=None, help="seconds per remote adapter fetch (default: render cost)")
    p.add_argument("--capacity", type=int, default=2, help="jobs a worker may hold at once")
    p.add_argument("--arrival", choices=("batch", "bursty"), default="batch")
    p.add_argument("--prior", type=float, default=None,
                   help="policy learns costs from this prior (seconds), as the dispatcher does (default: true costs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--sweep", action="store_true", help="run the sweep, write the plot and RESULTS.md")
    p.add_argument("--no-write", action="store_true", help="with --sweep: leave RESULTS.md and the plot alone")
    p.add_argument("--procs", type=int, default=2, help="with --sweep: processes")
    p.add_argument("--fair-sweep", action="store_true",
                   help="the several-submitter workloads (benchmarks/scheduler_fair.py), RESULTS.md and plot")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    command = "python -m benchmarks.scheduler " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.fair_sweep:
        from benchmarks import scheduler_fair

        t0 = time.time()
        arrivals, behind = scheduler_fair.fair_sweep(args.seed)
        text, summary = scheduler_fair.report(arrivals, behind, command, machine(), time.time() - t0)
        if not args.no_write:
            scheduler_fair.plot(arrivals, behind, os.path.join(HERE, "scheduler_fair.png"))
            write_section(text)
        print(json.dumps(summary, indent=None if args.json else 2))
        return 0
    if args.sweep:
        t0 = time.time()
        rows = sweep(args.seed, args.procs)
        costs = [decision_cost(), decision_cost(compositions=10_000)]
        text, summary = report(rows, costs, command, machine(), time.time() - t0, write_plot=not args.no_write)
        if not args.no_write:
            write_section(text)
        print(json.dumps(summary, indent=None if args.json else 2))
        return 0
    result = run_one(args.jobs, args.compositions, args.workers, args.alpha, args.compose_cost,
                     args.render_cost, args.seed, fetch=args.fetch_cost, capacity=args.capacity,
                     arrival=args.arrival, prior=args.prior)
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
