"""From a URL to an fsspec filesystem: protocol, per-protocol options, timeouts.

The store and the output writer open URLs through ``open_filesystem``; ``options_for``
is the one rule for finding a protocol's options in a manifest's ``storage_options``.
"""
from __future__ import annotations

import copy
from typing import Any

import fsspec
import fsspec.config
from fsspec.implementations.local import LocalFileSystem

from .errors import PermanentFetchError

__all__ = ["protocol_of", "options_for", "open_filesystem", "is_local"]


def protocol_of(url: str) -> str:
    """The fsspec protocol of ``url`` (``"file"`` for a plain path, last one if chained)."""
    last = url.split("::")[0]
    protocol, _ = fsspec.core.split_protocol(last)
    return protocol or "file"


def options_for(protocol: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """A deep copy of the options for ``protocol``, looked up under any of its aliases.

    Users write ``{"s3": {...}}`` once and expect ``s3a://`` URLs to use it too, and
    ``{"http": ...}`` to cover ``https://``. We copy so that adding defaults (timeouts)
    never mutates the caller's dict.
    """
    if not storage_options:
        return {}
    names = [protocol]
    try:
        cls = fsspec.get_filesystem_class(protocol)
        aliases = cls.protocol if isinstance(cls.protocol, (tuple, list)) else (cls.protocol,)
        names += [name for name in aliases if name != protocol]
    except (ValueError, ImportError):
        pass
    if protocol == "https":
        names.append("http")
    for name in names:
        if name in storage_options:
            return copy.deepcopy(dict(storage_options[name]))
    return {}


def _with_timeouts(protocol: str, opts: dict[str, Any], timeout_s: float | None) -> dict[str, Any]:
    """Add connect/read timeouts the user did not set, so a stalled server becomes a retry.

    Skipped where fsspec's own config sets the same nested dict: fsspec merges config
    and arguments shallowly, so ours would silently replace the user's.
    """
    configured = fsspec.config.conf.get(protocol, {})
    if not timeout_s:
        return opts
    if protocol in ("http", "https") and "client_kwargs" not in configured:
        import aiohttp

        client_kwargs = opts.setdefault("client_kwargs", {})
        client_kwargs.setdefault(
            "timeout", aiohttp.ClientTimeout(total=None, sock_connect=timeout_s, sock_read=timeout_s)
        )
    elif protocol in ("s3", "s3a") and "config_kwargs" not in configured:
        config = opts.setdefault("config_kwargs", {})
        config.setdefault("connect_timeout", timeout_s)
        config.setdefault("read_timeout", timeout_s)
    return opts


def open_filesystem(
    url: str, storage_options: dict[str, Any] | None, timeout_s: float | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(filesystem, path)`` for any fsspec URL; a bad protocol is a ``PermanentFetchError``.

    Options come from ``storage_options[protocol]``; fsspec's own configuration
    (``FSSPEC_*`` environment variables, ``fsspec.config.conf``) still applies underneath
    because we go through ``url_to_fs``. Chained URLs (``simplecache::s3://...``) get the
    whole per-protocol dict, which is exactly fsspec's chained-options format.
    """
    protocol = protocol_of(url)
    try:
        fsspec.get_filesystem_class(protocol)
        if "::" in url:
            return fsspec.core.url_to_fs(url, **copy.deepcopy(storage_options or {}))
        opts = _with_timeouts(protocol, options_for(protocol, storage_options), timeout_s)
        return fsspec.core.url_to_fs(url, **opts)
    except ImportError as e:
        raise PermanentFetchError(f"protocol {protocol!r} needs a package that is not installed: {e}", source=url) from e
    except (ValueError, TypeError) as e:
        raise PermanentFetchError(f"cannot open URL ({e})", source=url) from e


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """True for the local disk, where the store can serve files in place (no copy)."""
    return isinstance(fs, LocalFileSystem)
