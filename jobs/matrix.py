"""The matrix form: prompts × lora_sets × seeds, expanded into plain job field dicts.

Each axis is validated once, before expansion, so a bad LoRA in a lora_set is reported
once at ``matrix.lora_sets[1][0].strength`` rather than once per generated job.
"""
from __future__ import annotations

from typing import Any, Mapping

from .validate import (
    BAD, MAX_SEED, SCALAR_CHECKS, Problems, at, check_fields, check_id, check_int, check_list,
    check_loras, check_mapping, check_scalars, check_str,
)

#: Per-matrix overrides of the render defaults (the seed is an axis, not an override).
OVERRIDES = tuple(name for name in SCALAR_CHECKS if name != "seed")
MATRIX_FIELDS = ("prompts", "seeds", "lora_sets", "id_prefix", *OVERRIDES)
#: A typo such as ``count: 10000000`` should fail validation, not exhaust memory.
MAX_JOBS = 1_000_000
MAX_PREFIX = 80


def expand_matrices(value: Any, path: str, problems: Problems, defaults: Mapping,
                    base_dir: str | None) -> list[tuple[str, dict]]:
    """``matrix`` (one mapping or a list of them) -> ``[(label, job_fields), ...]``."""
    if isinstance(value, (list, tuple)):
        out: list[tuple[str, dict]] = []
        for i, item in enumerate(value):
            out.extend(expand_matrix(item, at(path, i), problems, defaults, base_dir))
        return out
    return expand_matrix(value, path, problems, defaults, base_dir)


def expand_matrix(value: Any, path: str, problems: Problems, defaults: Mapping,
                  base_dir: str | None) -> list[tuple[str, dict]]:
    """One matrix -> its jobs, prompt-major; nothing when any axis is invalid."""
    raw = check_mapping(value, path, problems)
    if raw is BAD:
        return []
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
    if len(problems) > start:
        return []
    total = len(prompts) * len(seeds) * len(lora_sets)
    if total > MAX_JOBS:
        problems.add(path, f"expands to {total} jobs (limit {MAX_JOBS})")
        return []
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


def _seeds(value: Any, path: str, problems: Problems) -> list[int]:
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
        return list(range(start, start + count))
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
