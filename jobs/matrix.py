"""The matrix form: prompts × lora_sets × seeds, expanded into plain job field dicts.

Each axis is validated once, before expansion, so a bad LoRA in a lora_set is reported
once at ``matrix.lora_sets[1][0].strength`` rather than once per generated job. How many
jobs every matrix makes (the product of its axes' lengths) is summed and checked against
``limits.MAX_JOBS`` before any matrix is expanded: ``seeds: {count: N}`` stays a range.
"""
from __future__ import annotations

from typing import Any, Mapping

from .limits import MAX_JOBS
from .validate import (
    BAD, MAX_SEED, SCALAR_CHECKS, Problems, at, check_fields, check_id, check_int, check_list,
    check_loras, check_mapping, check_scalars, check_str,
)

#: Per-matrix overrides of the render defaults (the seed is an axis, not an override).
OVERRIDES = tuple(name for name in SCALAR_CHECKS if name != "seed")
MATRIX_FIELDS = ("prompts", "seeds", "lora_sets", "id_prefix", *OVERRIDES)
MAX_PREFIX = 80


def expand_matrices(value: Any, path: str, problems: Problems, defaults: Mapping,
                    base_dir: str | None, budget: int = MAX_JOBS) -> list[tuple[str, dict]]:
    """``matrix`` (one mapping or a list of them) -> ``[(label, job_fields), ...]``; nothing
    when they make more than ``budget`` jobs together (what the other sources left of MAX_JOBS)."""
    items = [(at(path, i), v) for i, v in enumerate(value)] if isinstance(value, (list, tuple)) else [(path, value)]
    axes = [(where, _axes(item, where, problems, defaults, base_dir)) for where, item in items]
    sizes = [(where, len(a[1]) * len(a[2]) * len(a[3])) for where, a in axes if a is not None]
    limit = f"limit {MAX_JOBS}" + ("" if budget >= MAX_JOBS else f" per manifest, {MAX_JOBS - budget} taken by jobs")
    over = [(where, n) for where, n in sizes if n > budget]
    for where, n in over:
        problems.add(where, f"expands to {n} jobs ({limit})")
    total = sum(n for _, n in sizes)
    if total > budget and not over:
        problems.add(path, f"the matrices expand to {total} jobs in all ({limit}): "
                           + ", ".join(f"{where} {n}" for where, n in sizes[:5]) + (", ..." if len(sizes) > 5 else ""))
    if total > budget:
        return []
    return [job for where, a in axes if a is not None for job in _expand(where, *a)]


def expand_matrix(value: Any, path: str, problems: Problems, defaults: Mapping,
                  base_dir: str | None) -> list[tuple[str, dict]]:
    """One matrix -> its jobs, prompt-major; nothing when any axis is invalid."""
    return expand_matrices(value, path, problems, defaults, base_dir)


def _axes(value: Any, path: str, problems: Problems, defaults: Mapping,
          base_dir: str | None) -> tuple[dict, list, range | list, list, str | None] | None:
    """A matrix's checked ``(base fields, prompts, seeds, lora_sets, id prefix)``, or None."""
    raw = check_mapping(value, path, problems)
    if raw is BAD:
        return None
    start = len(problems)
    check_fields(raw, MATRIX_FIELDS, path, problems)
    base = {**defaults, **check_scalars(raw, OVERRIDES, path, problems)}
    prompts = _prompts(raw.get("prompts"), at(path, "prompts"), problems)
    seeds = _seeds(raw.get("seeds", [base["seed"]]), at(path, "seeds"), problems)
    lora_sets = _lora_sets(raw.get("lora_sets", [[]]), at(path, "lora_sets"), problems, base_dir)
    prefix = None
    if raw.get("id_prefix") is not None:
        prefix = check_id(raw["id_prefix"], at(path, "id_prefix"), problems)
        if prefix is not BAD and len(prefix) > MAX_PREFIX:
            # generated ids append "-p<i>-l<j>-s<seed>" and must stay within 128 characters
            problems.add(at(path, "id_prefix"), f"at most {MAX_PREFIX} characters (got {len(prefix)})")
    return None if len(problems) > start else (base, prompts, seeds, lora_sets, prefix)


def _expand(path: str, base: dict, prompts: list, seeds: range | list, lora_sets: list,
            prefix: str | None) -> list[tuple[str, dict]]:
    jobs = []
    for pi, prompt in enumerate(prompts):
        for li, loras in enumerate(lora_sets):
            for seed in seeds:
                job_id = f"{prefix}-p{pi}-l{li}-s{seed}" if prefix else None
                label = f"{path}(prompts[{pi}], lora_sets[{li}], seed {seed})"
                jobs.append((label, {**base, "prompt": prompt, "seed": seed, "loras": loras, "id": job_id}))
    return jobs


def _prompts(value: Any, path: str, problems: Problems) -> list[str]:
    if value is None:
        problems.add(path, "required")
        return []
    items = check_list(value, path, problems, nonempty=True)
    if items is BAD:
        return []
    return [check_str(p, at(path, i), problems, nonempty=True) for i, p in enumerate(items)]


def _seeds(value: Any, path: str, problems: Problems) -> range | list[int]:
    """A list of seeds, or ``{start: S, count: N}`` for the seeds S .. S+N-1."""
    if isinstance(value, Mapping):
        check_fields(value, ("start", "count"), path, problems)
        start = check_int(value.get("start", 0), at(path, "start"), problems, 0, MAX_SEED)
        count = check_int(value.get("count"), at(path, "count"), problems, 1, MAX_JOBS)
        if start is BAD or count is BAD:
            return []
        if start + count - 1 > MAX_SEED:
            problems.add(path, f"last seed must be <= {MAX_SEED}")
            return []
        return range(start, start + count)  # not a list: the total is checked before expansion
    items = check_list(value, path, problems, nonempty=True)
    if items is BAD:
        return []
    return [check_int(s, at(path, i), problems, 0, MAX_SEED) for i, s in enumerate(items)]


def _lora_sets(value: Any, path: str, problems: Problems, base_dir: str | None) -> list[list[dict]]:
    """Each set is a list of LoRA refs; ``[]`` is the base model without LoRA."""
    items = check_list(value, path, problems, nonempty=True)
    if items is BAD:
        return []
    return [check_loras(s, at(path, i), problems, base_dir) for i, s in enumerate(items)]
