"""`farm validate --deep` and `farm lora inspect`: LoRAs checked before any GPU starts.

Every LoRA a manifest names is fetched through the node cache (``storage.store.LoraStore``,
with the URI policy and size limit the workers use, so a file checked here is the one they
will read), its checksum checked, its header parsed and its layers bound to the manifest's
model, built on the meta device from its config (``workers.backends``' ``meta_transformer``;
for nunchaku from its checkpoint's safetensors header, ``workers.backends.nunchaku_meta``):
no weight is read or allocated, nothing rendered. Every problem is listed at once, each
with the file and the key.

Then each *composition* (the files a job uses together, keyed as the worker keys it: content
ids and strengths) is bound as a whole, once per distinct composition, full-weight diffs
included, as the worker's ``lora_core.plan`` would; a composition that cannot be composed
as a whole is one more problem line naming the jobs that use it; one that holds a file with
problems is a note naming its jobs, so the operator sees which jobs would fail.
"""
from __future__ import annotations

import json
from typing import Any, Mapping

from jobs.manifest import Manifest
from jobs.options import META_BACKENDS  # backends whose transformer builds without its weights

#: Composition problem lines shown at most (the rest summed up in one line), and job ids per line.
MAX_COMPOSITIONS = 20
MAX_JOBS_SHOWN = 5


def parse_model_spec(text: str) -> dict[str, Any]:
    """``--model``: a backend name (``tiny``) or a manifest's model mapping as JSON."""
    text = text.strip()
    if text.startswith("{"):
        try:
            spec = json.loads(text)
        except ValueError as e:
            raise ValueError(f"--model: not valid JSON: {e}") from e
        if not isinstance(spec, dict) or not isinstance(spec.get("backend"), str):
            raise ValueError('--model: a JSON object needs a "backend", e.g. {"backend": "diffusers", "path": DIR}')
        return spec
    return {"backend": text}


def meta_model(spec: Mapping[str, Any]):
    """The spec's transformer on the meta device (tiny: its built-in config; diffusers: the
    pipeline's ``config.json``; nunchaku: the checkpoint's safetensors header, nunchaku not
    imported); None for a backend none of these builds (``META_BACKENDS`` lists those that do)."""
    backend = spec.get("backend", "tiny")
    if backend == "tiny":
        from workers.backends.tiny import meta_transformer

        return meta_transformer()
    if backend in ("diffusers", "nunchaku"):
        from workers.backends.base import ModelPathError

        if not isinstance(spec.get("path"), str):
            what = "a pipeline directory" if backend == "diffusers" else "its .safetensors checkpoint"
            raise ModelPathError(f'the {backend} backend needs a "path" ({what})')
        if backend == "diffusers":
            from workers.backends.diffusers_backend import meta_transformer
        else:
            from workers.backends.nunchaku_meta import meta_transformer
        return meta_transformer(spec["path"])
    return None


def inspect_file(path: str, model: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``(summary, binding or None)`` of one local LoRA file (``lora_core.inspection``)."""
    from lora_core.inspection import bind_report, header_adapter, summary
    from lora_core.model_index import ModelIndex

    adapter = header_adapter(path)
    info = summary(path, adapter)
    if model is None:
        return info, None
    root = meta_model(model)
    if root is None:
        raise ValueError(f"--model: binding is checked for {', '.join(META_BACKENDS)}, not for backend "
                         f"{model.get('backend')!r}; without --model the file alone is read")
    return info, bind_report(adapter, ModelIndex(root))


def deep_problems(m: Manifest, cache_dir: str | None = None) -> tuple[list[str], list[str]]:
    """``(problems, notes)`` for every LoRA of ``m`` and every composition its jobs use; an
    empty problem list means all of them bind."""
    from lora_core.errors import LoraError
    from lora_core.inspection import bind_report, header_adapter
    from lora_core.model_index import ModelIndex
    from storage.node_cache import default_cache_dir
    from storage.policy import operator_policy
    from storage.store import LoraStore

    policy = operator_policy(m.base_dir)  # the workers' policy: the operator's roots, never the manifest's
    store = LoraStore(cache_dir or default_cache_dir(), storage_options=policy.guard(m.storage_options),
                      max_bytes=int(m.options.max_lora_mb * 2**20))
    refs = list(dict.fromkeys((ref.uri, ref.sha256) for job in m.jobs for ref in job.loras))
    problems: list[str] = []
    notes: list[str] = []
    index = None
    try:
        root = meta_model(m.model) if refs else None
    except Exception as e:  # noqa: BLE001 - a model that cannot be built is one problem, named
        problems.append(f"model {json.dumps(m.model, default=str)}: {type(e).__name__}: {e}")
        root = None
    else:
        if root is not None:
            index = ModelIndex(root)
        elif refs:
            notes.append(f"backend {m.model.get('backend')!r}: binding not checked (only {', '.join(META_BACKENDS)} "
                         "can be built without weights); fetch, checksum and header checked")
    adapters: dict[tuple[str, str | None], Any] = {}  # the files that are fine alone
    bad: set[tuple[str, str | None]] = set()
    for uri, sha in refs:
        try:
            policy.check(uri)
            fetched = store.fetch(uri, sha)
            adapter = header_adapter(fetched.path, content_id=fetched.sha256, name=uri)
        except LoraError as e:
            problems.append(f"{uri}: {type(e).__name__}: {e}")
            bad.add((uri, sha))
            continue
        refused = bind_report(adapter, index)["refused"] if index is not None else {}
        for target, why in refused.items():
            problems.append(f"{uri}: key {target}: {why}")
        if refused:
            bad.add((uri, sha))
        else:
            adapters[(uri, sha)] = adapter
    more_problems, more_notes = composition_problems(m.jobs, adapters, bad, index)
    return problems + more_problems, notes + more_notes


def compositions(jobs, adapters: Mapping, bad: set) -> dict[str, dict[str, Any]]:
    """``{composition key: {"pairs", "refs", "jobs", "bad"}}`` for the jobs with LoRAs, keyed as
    the worker keys what it composes (``lora_core.api.key_of_ids`` of content ids and strengths;
    by URI where a file could not be read)."""
    from lora_core.api import key_of_ids

    out: dict[str, dict[str, Any]] = {}
    for job in jobs:
        if not job.loras:
            continue
        refs = [(ref.uri, ref.sha256) for ref in job.loras]
        ids = [(adapters[r].content_id if r in adapters else f"uri:{r[0]}", float(ref.strength))
               for r, ref in zip(refs, job.loras)]
        c = out.setdefault(key_of_ids(ids), {"pairs": [], "refs": [], "jobs": [], "bad": []})
        if not c["jobs"]:
            c["refs"] = [(uri, float(ref.strength)) for (uri, _), ref in zip(refs, job.loras)]
            c["bad"] = sorted({uri for uri, sha in refs if (uri, sha) in bad})
            c["pairs"] = [(adapters[r], float(ref.strength)) for r, ref in zip(refs, job.loras) if r in adapters]
        c["jobs"].append(job.job_id)
    return out


def composition_problems(jobs, adapters: Mapping, bad: set, index) -> tuple[list[str], list[str]]:
    """``(problems, notes)`` per composition, each line naming the jobs that use it.

    Each composition of sound files is bound as a whole once (``lora_core.plan`` on the
    meta model, as the worker plans it): a failure there is a problem of its own. A
    composition that holds a file with problems (already listed by file) is a note: the
    jobs it names are the ones that would fail."""
    from lora_core.compose import plan
    from lora_core.errors import LoraError

    problems: list[str] = []
    notes: list[str] = []
    for c in compositions(jobs, adapters, bad).values():
        where = f"composition {_label(c['refs'])} ({_jobs(c['jobs'])})"
        if c["bad"]:
            notes.append(f"{where}: cannot be composed: {', '.join(c['bad'])} has problems")
            continue
        if index is None:
            continue
        try:
            plan(c["pairs"], index)
        except LoraError as e:
            problems.append(f"{where}: {type(e).__name__}: {_reason(e)}")
    return _capped(problems), _capped(notes)


def _capped(lines: list[str]) -> list[str]:
    if len(lines) <= MAX_COMPOSITIONS:
        return lines
    return lines[:MAX_COMPOSITIONS] + [f"... and {len(lines) - MAX_COMPOSITIONS} more composition(s)"]


def _reason(e: Exception) -> str:
    """The message without the file name a LoraError appends (the line names the files)."""
    text = str(e.args[0]) if e.args else str(e)
    return text.split(" (file ")[0]


def _label(refs: list[tuple[str, float]]) -> str:
    return "[" + " + ".join(f"{uri} x{s:g}" for uri, s in refs) + "]"


def _jobs(ids: list[str]) -> str:
    shown = ", ".join(ids[:MAX_JOBS_SHOWN])
    more = f" +{len(ids) - MAX_JOBS_SHOWN} more" if len(ids) > MAX_JOBS_SHOWN else ""
    return f"{len(ids)} job(s): {shown}{more}"
