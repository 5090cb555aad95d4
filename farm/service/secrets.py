"""What the farm keeps in Ray's own key-value store: a run's ``storage_options`` (its secrets,
never in the state root) and the farm config the controller last applied.

The state root is any fsspec URL, often shared storage that more people read than may
read a run's credentials. Ray's internal KV lives in the cluster's GCS: whoever can read
it is whoever Ray lets onto the cluster, the farm's trust boundary already; it survives a
controller restart (the controller recovers its runs with their secrets) but not the
cluster. A run recovered on a new cluster without its secrets fails its fetches with the
storage's own error, and the run's record says it had secrets (``has_secrets``).
"""
from __future__ import annotations

import json

NAMESPACE = "lora-farm"


def _key(run_id: str) -> bytes:
    return f"secrets/{run_id}".encode()


def put(run_id: str, storage_options: dict) -> None:
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(_key(run_id), json.dumps(storage_options).encode(), overwrite=True,
                                 namespace=NAMESPACE)


def get(run_id: str) -> dict:
    """The run's storage options, ``{}`` when none were kept."""
    from ray.experimental import internal_kv

    raw = internal_kv._internal_kv_get(_key(run_id), namespace=NAMESPACE)
    return json.loads(raw) if raw else {}


def delete(run_id: str) -> None:
    from ray.experimental import internal_kv

    internal_kv._internal_kv_del(_key(run_id), namespace=NAMESPACE)


CONFIG_KEY = b"config"


def save_config(config: dict) -> None:
    """The config `farm up` last applied (a reconcile included): a controller Ray restarts comes
    back with it, not with the arguments it was first created with."""
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(CONFIG_KEY, json.dumps(config).encode(), overwrite=True, namespace=NAMESPACE)


def load_config() -> dict | None:
    from ray.experimental import internal_kv

    raw = internal_kv._internal_kv_get(CONFIG_KEY, namespace=NAMESPACE)
    return json.loads(raw) if raw else None


def drop_config() -> None:
    """`farm down`: the next `farm up` on this cluster starts from its own config."""
    from ray.experimental import internal_kv

    internal_kv._internal_kv_del(CONFIG_KEY, namespace=NAMESPACE)
