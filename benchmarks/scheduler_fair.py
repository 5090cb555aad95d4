"""The scheduler benchmark's fair-share workloads (``python -m benchmarks.scheduler --fair-sweep``).

Two workloads, each swept over alpha 0.6/0.9/1.2 x compose/render 1/5/20 x workers 2/4/8/16
(render 1 s), simulated by ``farm/scheduler/sim.py`` driving the real policy:

* *arrivals*: 2000 jobs in runs (5-200 jobs, log-uniform; 1-6 compositions each from one
  Zipf(alpha) popularity over 100 compositions shared by every run and submitter) arriving
  as a Poisson process from two submitters, weights 1:1 and 1:2 (each run equally likely
  from either), and 1:1 where ``a`` submits 3 runs in 4, offered at 1.3x what the farm
  renders (so queues build and both submitters have queued work). Per configuration:
  fairness (``sim_fair.fair_shares``: while both have queued work, the worst relative
  deviation of a submitter's share of rendering worker-seconds from its weight share),
  and the cost of fairness (recompositions and makespan over ``fair=False`` on the same
  jobs), for ours (``AffinityScheduler()``: a submitter's runs pooled, a small run a flow of its
  own), ours with every run a flow (``fair_runs=True``, the rule before), ours sharing between
  submitters only (``fair_runs=False``) and ``fair=False``; and against the lower bounds and a
  witness that knows the future (``benchmarks.scheduler.told_deferring``, once per workload);
* *behind*: a 2000-job run (20 Zipf compositions), and 50 s later (200 s on 2 workers) a
  20-job run (1% of the queued work, 2 compositions of its own), from another submitter or
  the same one: the small run's time from arrival to its last job, over its time alone on
  the idle farm (same policy).
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Any

from farm.scheduler.affinity import AffinityScheduler
from farm.scheduler.sim import FarmModel, simulate
from farm.scheduler.sim_bounds import lower_bounds, recompositions_needed
from farm.scheduler.sim_fair import fair_shares, make_behind_workload, make_runs_workload, run_latency

SECTION = "## Scheduler: fair share and run arrivals (simulation)"
TARGETS = {"fairness": 0.10, "small_run": 2.0, "recompositions": 1.15, "makespan": 1.05,
           "arrivals_recompositions": 1.25, "arrivals_makespan": 1.15}
WEIGHTS = {"1:1": {"a": 1.0, "b": 1.0}, "1:2": {"a": 1.0, "b": 2.0}, "1:1, a submits 3x": {"a": 1.0, "b": 1.0}}
MIX = {"1:1, a submits 3x": (3.0, 1.0)}  # odds of each submitter per run; default even
GRID = [(a, c, k) for a in (0.6, 0.9, 1.2) for c in (1, 5, 20) for k in (2, 4, 8, 16)]
LOAD = 1.3  # offered work over what the farm renders while runs arrive
FAIR_POLICIES = ("fair", "fair_every_run", "fair_submitters_only")
POLICIES = FAIR_POLICIES + ("unfair",)


def run_arrivals(alpha: float, compose: float, workers: int, weights: dict[str, float], seed: int,
                 jobs: int = 2000, compositions: int = 100, mix: tuple[float, ...] | None = None) -> dict[str, Any]:
    farm = FarmModel(workers, compose, 1.0)
    work = make_runs_workload(jobs, compositions, alpha, seed, submitters=tuple(weights),
                              span_s=jobs * farm.render_s / (workers * LOAD), mix=mix)
    lb = lower_bounds(work, farm)
    needed = recompositions_needed(work, farm, TARGETS["arrivals_makespan"] * lb["makespan"])
    needed = needed if math.isfinite(needed) else None  # inf: no schedule meets the target (JSON has no inf)
    out: dict[str, Any] = {"runs": len({j.run for j in work}), "compositions": len({j.routing_key for j in work}),
                           "lb_makespan": round(lb["makespan"], 1), "lb_recompositions": lb["recompositions"],
                           "lb_recompositions_in_target": needed}
    for name, policy in (("fair", AffinityScheduler(weights=weights)),
                         ("fair_every_run", AffinityScheduler(weights=weights, fair_runs=True)),
                         ("fair_submitters_only", AffinityScheduler(weights=weights, fair_runs=False)),
                         ("unfair", AffinityScheduler(fair=False))):
        t0 = time.perf_counter()
        r = simulate(policy, work, farm)
        shares = fair_shares(r.trace, weights)
        out[name] = {"makespan": round(r.makespan, 1), "recompositions": r.recompositions,
                     "worst_deviation": None if shares["worst"] is None else round(shares["worst"], 4),
                     "window_s": round(shares["window_s"], 1), "yields": sum(getattr(policy, "yields", {}).values()),
                     "sim_s": round(time.perf_counter() - t0, 2),
                     "recomp_x_lb": round(r.recompositions / lb["recompositions"], 3),
                     "makespan_x_lb": round(r.makespan / lb["makespan"], 4)}
    for name in FAIR_POLICIES:
        out[name]["recomp_x_unfair"] = round(out[name]["recompositions"] / out["unfair"]["recompositions"], 3)
        out[name]["makespan_x_unfair"] = round(out[name]["makespan"] / out["unfair"]["makespan"], 4)
    target = TARGETS["arrivals_makespan"] * lb["makespan"]
    w = _witness(work, farm, target, (alpha, compose, workers, seed, jobs, compositions, mix, target))
    out["witness"] = {"recompositions": w["recompositions"], "makespan": round(w["makespan"], 1),
                      "budget_renders": w["budget_renders"], "recomp_x_lb": round(w["recompositions"] / lb["recompositions"], 3)}
    for name in POLICIES:
        out[name]["recomp_x_witness"] = round(out[name]["recompositions"] / w["recompositions"], 3)
    return out


_WITNESSES: dict[tuple, dict[str, Any]] = {}


def _witness(work: list, farm: FarmModel, makespan_target: float, key: tuple) -> dict[str, Any]:
    """The best schedule we construct that knows the future (``benchmarks.scheduler.told_deferring``:
    told every arrival, holding compositions back; the fewest recompositions within the makespan
    target, else the fastest), once per workload (1:1 and 1:2 share their jobs)."""
    from benchmarks.scheduler import told_deferring

    if key not in _WITNESSES:
        _WITNESSES[key] = told_deferring(work, farm, makespan_target, fair=False)
    return _WITNESSES[key]


def run_behind(alpha: float, compose: float, workers: int, same: bool, seed: int) -> dict[str, Any]:
    farm = FarmModel(workers, compose, 1.0)
    at = 200.0 if workers == 2 else 50.0
    work, alone = make_behind_workload(2000, 20, alpha, seed, small=20, at_s=at, same_submitter=same)
    by_itself = run_latency(simulate(AffinityScheduler(), alone, farm).trace)["small"]
    out: dict[str, Any] = {"alone_s": round(by_itself, 2)}
    for name, policy in (("fair", AffinityScheduler()), ("unfair", AffinityScheduler(fair=False))):
        r = simulate(policy, work, farm)
        first = min(t[2] for t in r.trace if t[0].run == "small")
        out[name] = {"latency_s": round(run_latency(r.trace)["small"], 2),
                     "x_alone": round(run_latency(r.trace)["small"] / by_itself, 3),
                     "first_start_after_s": round(first - at, 2), "large_makespan": round(r.makespan, 1)}
    return out


def fair_sweep(seed: int = 0) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One process, in order: every arrivals configuration, then every behind one."""
    arrivals = [dict(run_arrivals(a, c, k, w, seed, mix=MIX.get(label)), alpha=a, compose=c, workers=k, weights=label)
                for label, w in WEIGHTS.items() for a, c, k in GRID]
    behind = [dict(run_behind(a, c, k, same, seed), alpha=a, compose=c, workers=k,
                   submitter="same" if same else "other")
              for same in (False, True) for a, c, k in GRID]
    return arrivals, behind


def _p95(values: list[float]) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(round(0.95 * (len(v) - 1))))]


def summarize(arrivals: list[dict[str, Any]], behind: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for label in WEIGHTS:
        rows = [r for r in arrivals if r["weights"] == label]
        entry: dict[str, Any] = {"configs": len(rows)}
        for name in POLICIES:
            dev = [r[name]["worst_deviation"] for r in rows if r[name]["worst_deviation"] is not None]
            rd = [r[name]["recomp_x_lb"] for r in rows]
            md = [r[name]["makespan_x_lb"] for r in rows]
            entry[name] = {"worst_deviation": round(max(dev), 3), "median_deviation": round(statistics.median(dev), 3),
                           "fairness_met": sum(d <= TARGETS["fairness"] for d in dev),
                           "recomp_x_lb_median": round(statistics.median(rd), 3), "recomp_x_lb_max": round(max(rd), 3),
                           "makespan_x_lb_median": round(statistics.median(md), 3),
                           "makespan_x_lb_max": round(max(md), 3),
                           "arrivals_met": sum(a <= TARGETS["arrivals_recompositions"]
                                               and b <= TARGETS["arrivals_makespan"] for a, b in zip(rd, md))}
            rw = [r[name]["recomp_x_witness"] for r in rows]
            entry[name].update(recomp_x_witness_median=round(statistics.median(rw), 3),
                               recomp_x_witness_max=round(max(rw), 3),
                               witness_met=sum(a <= TARGETS["arrivals_recompositions"]
                                               and b <= TARGETS["arrivals_makespan"] for a, b in zip(rw, md)))
            if name != "unfair":
                rec = [r[name]["recomp_x_unfair"] for r in rows]
                mk = [r[name]["makespan_x_unfair"] for r in rows]
                entry[name].update(
                    recomp_x_unfair_max=round(max(rec), 3), recomp_x_unfair_median=round(statistics.median(rec), 3),
                    makespan_x_unfair_max=round(max(mk), 3), makespan_x_unfair_median=round(statistics.median(mk), 3),
                    cost_met=sum(a <= TARGETS["recompositions"] and b <= TARGETS["makespan"] for a, b in zip(rec, mk)),
                    all_met=sum(r[name]["worst_deviation"] is not None
                                and r[name]["worst_deviation"] <= TARGETS["fairness"]
                                and r[name]["recomp_x_unfair"] <= TARGETS["recompositions"]
                                and r[name]["makespan_x_unfair"] <= TARGETS["makespan"] for r in rows))
        wx = [r["witness"]["recomp_x_lb"] for r in rows]
        need = [r["lb_recompositions_in_target"] / r["lb_recompositions"] for r in rows
                if r["lb_recompositions_in_target"] is not None] or [math.nan]
        entry["witness"] = {"recomp_x_lb_median": round(statistics.median(wx), 3), "recomp_x_lb_max": round(max(wx), 3),
                            "needed_x_lb_median": round(statistics.median(need), 3),
                            "needed_x_lb_max": round(max(need), 3)}
        out[label] = entry
    for who in ("other", "same"):
        rows = [r for r in behind if r["submitter"] == who]
        out[f"behind, {who} submitter"] = {
            name: {"p95_x_alone": round(_p95([r[name]["x_alone"] for r in rows]), 2),
                   "worst_x_alone": round(max(r[name]["x_alone"] for r in rows), 2),
                   "met": sum(r[name]["x_alone"] <= TARGETS["small_run"] for r in rows),
                   "worst_first_start_s": round(max(r[name]["first_start_after_s"] for r in rows), 2)}
            for name in ("fair", "unfair")} | {"configs": len(rows)}
    return out


def plot(arrivals: list[dict[str, Any]], behind: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 1, figsize=(14, 16))
    labels = [f"a{a} c{c:g} k{k}" for a, c, k in GRID]
    for label, marker in zip(WEIGHTS, ("o", "s", "^")):
        rows = [r for r in arrivals if r["weights"] == label]
        for name, ls in (("fair", "-"), ("fair_every_run", "-."), ("fair_submitters_only", ":"), ("unfair", "--")):
            axes[0].plot([r[name]["worst_deviation"] or 0 for r in rows], marker=marker, ms=3, ls=ls,
                         label=f"{label} {name}")
        for name, ls in (("fair", "-"), ("fair_every_run", "-."), ("fair_submitters_only", ":")):
            axes[1].plot([r[name]["recomp_x_unfair"] for r in rows], marker=marker, ms=3, ls=ls, label=f"{label} {name}")
            axes[2].plot([r[name]["makespan_x_unfair"] for r in rows], marker=marker, ms=3, ls=ls, label=f"{label} {name}")
    for who, marker in (("other", "o"), ("same", "s")):
        rows = [r for r in behind if r["submitter"] == who]
        for name, ls in (("fair", "-"), ("unfair", "--")):
            axes[3].plot([r[name]["x_alone"] for r in rows], marker=marker, ms=3, ls=ls, label=f"{who} submitter, {name}")
    titles = ("arrivals: worst |share - weight share| / weight share", "arrivals: recompositions / fair=False",
              "arrivals: makespan / fair=False", "small run behind a large one: its time / alone")
    for ax, title, target in zip(axes, titles, (TARGETS["fairness"], TARGETS["recompositions"],
                                                TARGETS["makespan"], TARGETS["small_run"])):
        ax.axhline(target, color="grey", ls="--", lw=0.8, label=f"target {target}")
        ax.set_title(title)
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[3].set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(arrivals: list[dict[str, Any]], behind: list[dict[str, Any]], command: str, host: str,
           seconds: float) -> tuple[str, dict[str, Any]]:
    """The RESULTS.md section and its JSON summary."""
    s = summarize(arrivals, behind)
    n = len(GRID)
    lines = [
        SECTION, "",
        f"Command: `{command}` ({seconds:.0f} s, one process)  ",
        f"Machine: {host}  ",
        "Workloads and measures: `benchmarks/scheduler_fair.py` (docstring); `farm/scheduler/sim_fair.py`. "
        "Plot: `benchmarks/scheduler_fair.png`. Targets: fairness within "
        f"±{TARGETS['fairness']:.0%} of the weight share; small run <= {TARGETS['small_run']:g}x its time alone "
        f"(p95); recompositions <= {TARGETS['recompositions']}x and makespan <= {TARGETS['makespan']}x "
        "`fair=False` on the same jobs.", "",
        "**Arrivals** (two submitters, runs arriving as a Poisson process):", "",
        "| weights | policy | configs | fairness met | worst / median deviation | cost met (recomp. and makespan) "
        "| recomp. x fair=False, median / max | makespan x fair=False, median / max | all three met |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label in WEIGHTS:
        for name in POLICIES:
            e = s[label][name]
            cost = ("-", "-", "-", "-") if name == "unfair" else (
                e["cost_met"], f"{e['recomp_x_unfair_median']} / {e['recomp_x_unfair_max']}",
                f"{e['makespan_x_unfair_median']} / {e['makespan_x_unfair_max']}", e["all_met"])
            lines.append(f"| {label} | {name} | {n} | {e['fairness_met']} | {e['worst_deviation']} / "
                         f"{e['median_deviation']} | {cost[0]} | {cost[1]} | {cost[2]} | {cost[3]} |")
    lines += ["", "**Arrivals against the lower bound and a witness** (`sim_bounds.lower_bounds` on the same jobs: D, "
              "every distinct composition composed once, and the makespan bound with its arrival terms; the witness: "
              "the best schedule we construct that knows the future, `benchmarks.scheduler.told_deferring`: told "
              "every arrival, holding back compositions more jobs will come for, the fewest recompositions within "
              f"{TARGETS['arrivals_makespan']}x the makespan bound over its budgets, fair=False). Target: "
              f"recompositions <= {TARGETS['arrivals_recompositions']}x the witness and makespan <= "
              f"{TARGETS['arrivals_makespan']}x the bound. The row 'bound within the makespan target' is "
              "`sim_bounds.recompositions_needed` at that target: D plus the compositions any schedule that fast "
              "composes on both sides of some arrival (a lower bound for every schedule meeting the makespan "
              "target, the witness included):", "",
              "| weights | policy | recomp. x witness, median / max | recomp. x D, median / max | "
              "makespan x bound, median / max | both met (vs witness) | both met (vs D) |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for label in WEIGHTS:
        w = s[label]["witness"]
        lines.append(f"| {label} | bound within the makespan target | - | {w['needed_x_lb_median']} / "
                     f"{w['needed_x_lb_max']} | - | - | - |")
        lines.append(f"| {label} | witness | 1 | {w['recomp_x_lb_median']} / {w['recomp_x_lb_max']} | - | - | - |")
        for name in ("fair", "fair_every_run", "unfair"):
            e = s[label][name]
            lines.append(f"| {label} | {name} | {e['recomp_x_witness_median']} / {e['recomp_x_witness_max']} | "
                         f"{e['recomp_x_lb_median']} / {e['recomp_x_lb_max']} | "
                         f"{e['makespan_x_lb_median']} / {e['makespan_x_lb_max']} | {e['witness_met']} of {n} | "
                         f"{e['arrivals_met']} of {n} |")
    lines += ["", "**Small run behind a large one** (20 jobs behind 2000):", "",
              "| small run's submitter | policy | configs | <= 2x alone | p95 x alone | worst x alone | "
              "latest first start after its arrival, s |", "|---|---|---:|---:|---:|---:|---:|"]
    for who in ("other", "same"):
        e = s[f"behind, {who} submitter"]
        for name in ("fair", "unfair"):
            m = e[name]
            lines.append(f"| {who} | {name} | {e['configs']} | {m['met']} | {m['p95_x_alone']} | "
                         f"{m['worst_x_alone']} | {m['worst_first_start_s']} |")
    lines += ["", "<details><summary>arrivals: every configuration</summary>", "",
              "| weights | alpha | compose/render | workers | runs | window s | deviation fair / every run / "
              "submitters only / fair=False | recomp. fair / every run / submitters only / fair=False / witness | "
              "makespan fair / every run / submitters only / fair=False / witness | yields |",
              "|---|---:|---:|---:|---:|---:|---|---|---|---:|"]
    for r in arrivals:
        ps = [r[name] for name in POLICIES]
        lines.append(f"| {r['weights']} | {r['alpha']} | {r['compose']:g} | {r['workers']} | {r['runs']} | "
                     f"{r['fair']['window_s']:.0f} | {' / '.join(str(p['worst_deviation']) for p in ps)} | "
                     f"{' / '.join(str(p['recompositions']) for p in ps + [r['witness']])} | "
                     f"{' / '.join(str(p['makespan']) for p in ps + [r['witness']])} | {r['fair']['yields']} |")
    lines += ["", "</details>", "", "<details><summary>small run behind a large one: every configuration</summary>", "",
              "| submitter | alpha | compose/render | workers | alone s | fair s (x alone) | fair=False s (x alone) |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for r in behind:
        lines.append(f"| {r['submitter']} | {r['alpha']} | {r['compose']:g} | {r['workers']} | {r['alone_s']} | "
                     f"{r['fair']['latency_s']} ({r['fair']['x_alone']}) | "
                     f"{r['unfair']['latency_s']} ({r['unfair']['x_alone']}) |")
    lines += ["", "</details>"]
    return "\n".join(lines) + "\n", s
