"""Which URIs a LoRA reference may reach: the operator decides, never the manifest.

A manifest is untrusted input (``farm run`` of a file someone sent, ``farm submit`` to a
shared cluster), and a LoRA URI is a read the farm performs on its behalf. So:

* **Local paths** (plain paths, ``file://``, ``local://``) are allowed only under allowed
  roots: the manifest's directory, ``$LORA_FARM_LORA_ROOTS`` (``os.pathsep``-separated)
  and ``farm run --lora-root DIR``. Paths are resolved with symlinks (``realpath``) before
  they are compared, so ``root/../../etc/passwd`` and a symlink pointing out of a root are
  refused. ``DENIED_ROOTS`` (``/proc``, ``/sys``, ``/dev``, ``/etc``) are refused whatever
  the roots say: a second belt for a root configured too wide (``/``).
* **Remote protocols**: by default every protocol fsspec knows except the ones that read
  local disk in ways a root cannot confine (``UNCONFINED_PROTOCOLS``: caching wrappers
  whose ``cache_storage`` option serves any directory, archive wrappers whose ``fo``
  option opens any file, ``dir``, ``reference``, ``git``...). ``$LORA_FARM_LORA_PROTOCOLS``
  (comma-separated) replaces that list; ``$LORA_FARM_LORA_HOSTS`` (comma-separated
  ``host`` or ``host:port``; the bucket for s3/gs) restricts remote URLs to those hosts.
* **Redirects** are checked hop by hop against the same policy (``RedirectGuard``, an
  aiohttp trace hook in the HTTP filesystem's session): a redirect never reaches a local
  file, never downgrades https to http, and never leaves the allowed protocols or hosts.

The manifest cannot widen any of this: roots and protocols come from the environment of
the farm's own process and from its command line, not from manifest fields. Pure: no
torch, no Ray; fsspec only for its list of protocols.
"""
from __future__ import annotations

import copy
import functools
import os
from contextlib import contextmanager
import urllib.parse
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping

from .errors import ForbiddenUriError

__all__ = [
    "UriPolicy", "RedirectGuard", "operator_policy", "policy_for", "cached_refusal", "roots_in_env", "default_protocols",
    "LORA_ROOTS_ENV", "LORA_PROTOCOLS_ENV", "LORA_HOSTS_ENV", "DENIED_ROOTS",
    "LOCAL_PROTOCOLS", "UNCONFINED_PROTOCOLS",
]

LORA_ROOTS_ENV = "LORA_FARM_LORA_ROOTS"
LORA_PROTOCOLS_ENV = "LORA_FARM_LORA_PROTOCOLS"
LORA_HOSTS_ENV = "LORA_FARM_LORA_HOSTS"
#: Never readable as a LoRA, whatever the roots: kernel and device files, system config.
DENIED_ROOTS = ("/proc", "/sys", "/dev", "/etc")
#: Protocols whose path is a local path: checked against the roots.
LOCAL_PROTOCOLS = frozenset({"file", "local"})
#: Protocols that read local disk through options or indirections a root check cannot see:
#: not allowed unless the operator lists them in ``$LORA_FARM_LORA_PROTOCOLS``.
UNCONFINED_PROTOCOLS = frozenset({
    "simplecache", "filecache", "blockcache", "cached",      # cache_storage=/any/dir serves its files
    "zip", "tar", "libarchive",                               # fo=/any/file
    "dir", "reference", "git", "dvc", "generic", "dask",      # a path prefix, refs or a repo given in options
    "asynclocal", "async_wrapper", "asyncwrapper",            # wrap the local filesystem
})
_HTTP = frozenset({"http", "https"})


def default_protocols() -> tuple[str, ...]:
    """Every protocol fsspec knows, less the local and the unconfined ones."""
    from fsspec.registry import known_implementations, registry

    known = set(known_implementations) | set(registry)
    return tuple(sorted(known - LOCAL_PROTOCOLS - UNCONFINED_PROTOCOLS))


def _real(path: str) -> str:
    """Absolute, ``~`` expanded, every symlink and ``..`` resolved (missing tails kept)."""
    return os.path.realpath(os.path.abspath(os.path.expanduser(path)))


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _split(segment: str) -> str | None:
    """The protocol of one segment of a (possibly chained) URL; None for a local path."""
    if "://" not in segment:
        return None
    return segment.partition("://")[0].lower()


@dataclass(frozen=True)
class UriPolicy:
    """What LoRA URIs may reach. Build with ``UriPolicy.build`` or ``operator_policy``.

    ``roots``: resolved local directories; ``protocols``: allowed remote protocols;
    ``hosts``: allowed remote hosts (``None``: any). Tuples, sorted: picklable (it travels
    to Ray workers) and with a repr that does not depend on hash seeds.
    """

    roots: tuple[str, ...]
    protocols: tuple[str, ...]
    hosts: tuple[str, ...] | None = None

    @classmethod
    def build(cls, roots: Iterable[str], protocols: Iterable[str] | None = None,
              hosts: Iterable[str] | None = None) -> UriPolicy:
        real = tuple(sorted({_real(r) for r in roots if r}))
        protos = default_protocols() if protocols is None else tuple(sorted({p.strip().lower() for p in protocols}))
        host_list = None if hosts is None else tuple(sorted({h.strip().lower() for h in hosts if h.strip()}))
        return cls(real, tuple(p for p in protos if p), host_list)

    # ---- the decision ----------------------------------------------------------------------
    def refusal(self, uri: str) -> str | None:
        """Why ``uri`` may not be read as a LoRA (the rule, naming what it resolved to), or None."""
        segments = uri.split("::")
        for i, segment in enumerate(segments):  # chained: every layer is a read of its own
            protocol = _split(segment)
            if protocol is None and i < len(segments) - 1:
                protocol = segment.lower()  # fsspec: a bare name before "::" is a protocol (simplecache::s3://...)
            if protocol is None or protocol in LOCAL_PROTOCOLS:
                reason = self._local_refusal(segment)
            else:
                reason = self._remote_refusal(protocol, segment)
            if reason is not None:
                return reason
        return None

    def allows(self, uri: str) -> bool:
        return self.refusal(uri) is None

    def check(self, uri: str) -> None:
        """Raise ``ForbiddenUriError`` (naming the URI and the rule) unless ``uri`` is allowed."""
        reason = self.refusal(uri)
        if reason is not None:
            raise ForbiddenUriError(f"LoRA URI refused by the farm's URI policy: {reason}", source=uri)

    def redirect_refusal(self, source: str, target: str) -> str | None:
        """Why a redirect from ``source`` to ``target`` may not be followed, or None."""
        src, dst = _split(source), _split(target)
        if dst is None or dst in LOCAL_PROTOCOLS or dst in UNCONFINED_PROTOCOLS:
            return f"a redirect never reaches local files (to {target!r})"
        if src == "https" and dst == "http":
            return f"a redirect may not downgrade https to http (to {target!r})"
        reason = self.refusal(target)
        return None if reason is None else f"redirect to {target!r}: {reason}"

    def _local_refusal(self, segment: str) -> str | None:
        from fsspec.implementations.local import LocalFileSystem

        # the path exactly as fsspec will open it ("file:/etc/x" and "local:x" are local paths too)
        real = _real(LocalFileSystem._strip_protocol(segment))
        shown = repr(segment) if real == segment else f"{segment!r} (resolves to {real!r})"
        for denied in DENIED_ROOTS:
            if _under(real, denied):
                return f"{shown} is under {denied}, which is never readable as a LoRA"
        if not any(_under(real, root) for root in self.roots):
            where = ", ".join(repr(r) for r in self.roots[:4]) or "none"
            more = f" and {len(self.roots) - 4} more" if len(self.roots) > 4 else ""
            return (f"{shown} is not under an allowed LoRA root (allowed: {where}{more}; the manifest's "
                    f"directory, ${LORA_ROOTS_ENV} or `farm run --lora-root DIR`)")
        return None

    def _remote_refusal(self, protocol: str, segment: str) -> str | None:
        if protocol not in self.protocols:
            why = " (it reads local disk outside the roots)" if protocol in UNCONFINED_PROTOCOLS else ""
            return f"protocol {protocol!r} is not allowed for LoRAs{why}; the operator sets ${LORA_PROTOCOLS_ENV}"
        if self.hosts is not None:
            netloc = urllib.parse.urlsplit(segment).netloc.rpartition("@")[2].lower()
            host = netloc.rsplit(":", 1)[0] if netloc.count(":") == 1 else netloc
            if netloc not in self.hosts and host not in self.hosts:
                return f"host {netloc!r} is not allowed for LoRAs; the operator sets ${LORA_HOSTS_ENV}"
        return None

    # ---- enforcement in the HTTP client --------------------------------------------------
    def guard(self, storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
        """``storage_options`` with a ``RedirectGuard`` in the http and https options (a copy)."""
        from .urls import options_for

        out = copy.deepcopy(dict(storage_options or {}))
        for protocol in sorted(_HTTP):
            opts = options_for(protocol, storage_options)  # the user's own, found under any alias
            opts.setdefault("get_client", RedirectGuard(self))
            out[protocol] = opts
        return out


@dataclass(frozen=True, repr=False)
class RedirectGuard:
    """fsspec HTTP ``get_client``: an aiohttp session whose every redirect is checked.

    Called by the HTTP filesystem to make its session; the trace hook runs before aiohttp
    follows a redirect (and before aiohttp's own refusal of non-http schemes, so the error
    names our rule). It raises ``ForbiddenUriError``, which the store reports as permanent.
    """

    policy: UriPolicy

    def __repr__(self) -> str:
        # options are hashed by their str, by the store (index keys) and by fsspec (its cache of
        # filesystem instances): the same in every process (sorted tuples), another per policy
        return f"RedirectGuard({self.policy!r})"

    async def __call__(self, **client_kwargs: Any) -> Any:
        import aiohttp

        trace = aiohttp.TraceConfig()
        trace.on_request_redirect.append(self._on_redirect)
        configs = [*(client_kwargs.pop("trace_configs", None) or ()), trace]
        return aiohttp.ClientSession(trace_configs=configs, **client_kwargs)

    async def _on_redirect(self, session: Any, context: Any, params: Any) -> None:
        headers = params.response.headers
        location = headers.get("Location") or headers.get("URI")
        if location is None:
            return
        source = str(params.url)
        target = urllib.parse.urljoin(source, location)
        reason = self.policy.redirect_refusal(source, target)
        if reason is not None:
            params.response.close()
            # no source: the store's retry loop names the URI it was asked for, hop 0
            raise ForbiddenUriError(f"LoRA URI refused by the farm's URI policy: {reason} (from {source!r})")


def _env_list(environ: Mapping[str, str], name: str, sep: str) -> list[str] | None:
    value = environ.get(name)
    if value is None or not value.strip():
        return None
    return [part.strip() for part in value.split(sep) if part.strip()]


def operator_policy(manifest_dir: str | None = None, roots: Iterable[str] = (), *,
                    environ: Mapping[str, str] | None = None) -> UriPolicy:
    """The policy the operator configured, for a manifest in ``manifest_dir``.

    Roots: ``manifest_dir`` (a local one; a manifest read from a URL adds none; ``None``,
    a manifest built in code, stands for the working directory, where its relative paths
    resolve; ``""``, none at all: the farm service, whose submitters' directories are no
    roots), then ``$LORA_FARM_LORA_ROOTS``, then ``roots``. Protocols and hosts from
    ``$LORA_FARM_LORA_PROTOCOLS`` / ``$LORA_FARM_LORA_HOSTS`` when set.
    """
    env = os.environ if environ is None else environ
    all_roots = list(roots)
    if manifest_dir is None:
        all_roots.append(os.getcwd())
    elif "://" not in manifest_dir and "::" not in manifest_dir:
        all_roots.append(manifest_dir)
    all_roots += _env_list(env, LORA_ROOTS_ENV, os.pathsep) or []
    return UriPolicy.build(all_roots, _env_list(env, LORA_PROTOCOLS_ENV, ","), _env_list(env, LORA_HOSTS_ENV, ","))


def policy_for(manifest_dir: str | None) -> UriPolicy:
    """``operator_policy(manifest_dir)``, memoized on everything it reads (validation asks
    once per LoRA reference; resolving the roots again each time would cost syscalls)."""
    get = os.environ.get
    env = (get(LORA_ROOTS_ENV), get(LORA_PROTOCOLS_ENV), get(LORA_HOSTS_ENV))
    return _cached_policy(manifest_dir, os.getcwd() if manifest_dir is None else None, env)


@functools.lru_cache(maxsize=8192)
def cached_refusal(policy: UriPolicy, uri: str) -> str | None:
    """``policy.refusal(uri)``, memoized: for validation, where a few LoRAs recur in many jobs.
    Not for fetch time, which must see a symlink swapped in since (the worker asks anew)."""
    return policy.refusal(uri)


@functools.lru_cache(maxsize=64)
def _cached_policy(manifest_dir: str | None, cwd: str | None, env: tuple[str | None, ...]) -> UriPolicy:
    names = (LORA_ROOTS_ENV, LORA_PROTOCOLS_ENV, LORA_HOSTS_ENV)
    return operator_policy(manifest_dir, environ={k: v for k, v in zip(names, env) if v is not None})


@contextmanager
def roots_in_env(roots: Iterable[str]) -> Iterator[None]:
    """``$LORA_FARM_LORA_ROOTS`` with ``roots`` added for the block (``farm run --lora-root``),
    so validation of the manifest sees the same roots as the workers that will fetch."""
    extra = [os.path.abspath(os.path.expanduser(r)) for r in roots]
    before = os.environ.get(LORA_ROOTS_ENV)
    if extra:
        os.environ[LORA_ROOTS_ENV] = os.pathsep.join([*(_env_list(os.environ, LORA_ROOTS_ENV, os.pathsep) or []), *extra])
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(LORA_ROOTS_ENV, None)
        else:
            os.environ[LORA_ROOTS_ENV] = before
