"""`farm validate --deep` and `farm lora inspect`: LoRAs checked before any GPU starts.

Every LoRA a manifest names is fetched through the node cache (``storage.store.LoraStore``,
with the URI policy and size limit the workers use, so a file checked here is the one they
will read), its checksum checked, its header parsed and its layers bound to the manifest's
model, built on the meta device from its config (``workers.backends``' ``meta_transformer``):
no weight is read or allocated, nothing rendered. Every problem is listed at once, each
with the file and the key.
"""
from __future__ import annotations

import json
from typing import Any, Mapping

from jobs.manifest import Manifest

#: Backends whose transformer can be built from a config alone (the others: fetch, checksum
#: and header checks only, and a note that binding was not checked).
META_BACKENDS = ("tiny", "diffusers")


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
    """The spec's transformer on the meta device; None for a backend that cannot build one
    from its config (its loader needs the weights: nunchaku's packed layers)."""
    backend = spec.get("backend", "tiny")
    if backend == "tiny":
        from workers.backends.tiny import meta_transformer

        return meta_transformer()
    if backend == "diffusers":
        from workers.backends.base import ModelPathError
        from workers.backends.diffusers_backend import meta_transformer

        if not isinstance(spec.get("path"), str):
            raise ModelPathError('the diffusers backend needs a "path" (a pipeline directory)')
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
        raise ValueError(f"backend {model.get('backend')!r} cannot be built without its weights; "
                         f"binding is checked for {', '.join(META_BACKENDS)}")
    return info, bind_report(adapter, ModelIndex(root))


def deep_problems(m: Manifest, cache_dir: str | None = None) -> tuple[list[str], list[str]]:
    """``(problems, notes)`` for every LoRA of ``m``; an empty problem list means all bind."""
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
    for uri, sha in refs:
        try:
            policy.check(uri)
            fetched = store.fetch(uri, sha)
            adapter = header_adapter(fetched.path, content_id=fetched.sha256)
        except LoraError as e:
            problems.append(f"{uri}: {type(e).__name__}: {e}")
            continue
        if index is not None:
            for target, why in bind_report(adapter, index)["refused"].items():
                problems.append(f"{uri}: key {target}: {why}")
    return problems, notes
