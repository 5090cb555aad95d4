"""storage: files in and out of any fsspec URL, for the farm. No torch, no Ray.

One concept per module; import the one you need (this package imports nothing itself, so
``lora_core.errors`` can reach ``storage.errors`` without pulling in fsspec):

- ``storage.store``: ``LoraStore``, the node-local cache LoRA files are fetched into
  (``FetchResult``, ``default_store``, ``default_cache_dir``).
- ``storage.node_cache``: its on-disk half, ``DiskCache``: blobs by sha256 (served only
  verified), the URL index, leases and LRU eviction, in a private dir. Never talks to
  remote storage.
- ``storage.fetch``: one transfer and its faults: ``with_retries``,
  ``classify_fetch_error`` (retry or fail fast), remote identity, progress, and its
  bounds (``TransferGuard``: size limit, rate floor; ``guarded_get``).
- ``storage.urls``: URL to filesystem: ``open_filesystem``, ``protocol_of``,
  ``options_for``, ``is_local``.
- ``storage.output``: ``write_bytes_atomic`` (images, result tables) and
  ``ensure_under`` (output paths from manifests stay under the output root).
- ``storage.policy``: ``UriPolicy``, what a LoRA URI may reach (the operator's roots and
  protocols; redirects checked), ``operator_policy``.
- ``storage.localfs``: the local-disk primitives the others share (``hash_file``,
  ``ensure_private_dir``).
- ``storage.errors``: ``LoraError`` (the root of the farm's error hierarchy) and
  ``FetchError`` with its kinds.
"""
