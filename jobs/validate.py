"""Field checks for manifests: every problem is collected with its path, none raises early.

Each ``check_*`` takes ``(value, path, problems)`` and returns the normalized value, or
``BAD`` after recording why it is wrong, so one pass over a manifest reports everything
a user has to fix (``jobs[3].loras[0].strength: not a number``) instead of the first
error only. Nothing here does I/O or builds a job; ``manifest.py`` does that. Farm options
are checked against what ``FarmOptions`` (``options.py``) declares for each.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import posixpath
import re
import reprlib
from typing import Any, Callable, Iterable, Mapping

from storage.policy import cached_refusal, policy_for

from .limits import MAX_PROMPT_CHARS, Problems, lone_surrogate
from .options import BACKENDS, PATH_BACKENDS, FarmOptions, option_fields

#: User-chosen job ids become file names (``images/<id>.png``): no ``/``, no ``..``.
ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
SHA256_RE = re.compile(r"[0-9a-fA-F]{64}\Z")
#: Seeds land in an int64 Parquet column, so they must fit one.
MAX_SEED = 2**63 - 1
MAX_STEPS = 1000
MIN_SIZE, MAX_SIZE, SIZE_MULTIPLE = 16, 4096, 16

#: Built-in render defaults, overridden by the manifest's ``defaults`` then by each job.
RENDER_DEFAULTS: dict[str, Any] = {
    "steps": 4, "width": 256, "height": 256, "guidance": 1.0,
    "negative_prompt": "", "seed": 0, "priority": 0,
}
LORA_FIELDS = ("uri", "strength", "sha256")


class _Bad:
    def __repr__(self) -> str:
        return "BAD"


#: Returned by a check after it recorded a problem; never a valid value.
BAD: Any = _Bad()


def at(path: str, key: str | int) -> str:
    """The path of ``key`` inside ``path``: ``jobs`` + 3 -> ``jobs[3]``, + ``seed`` -> ``jobs[3].seed``."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


class _ShortRepr(reprlib.Repr):
    def repr_int(self, x: int, level: int) -> str:
        # repr() refuses ints past 4300 digits (and would be slow): YAML reads 0xfff... as one
        return super().repr_int(x, level) if x.bit_length() < 10_000 else f"<an int of {x.bit_length()} bits>"


_SHORT = _ShortRepr()  # keyword arguments only from Python 3.12
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother = 2, 40, 40
_SHORT.maxlist = _SHORT.maxdict = _SHORT.maxtuple = _SHORT.maxset = 4


def describe(value: Any) -> str:
    """A short ``(got TYPE VALUE)`` for messages; long values are cut (in bounded work:
    ``reprlib`` never builds the whole repr of a huge or deep value)."""
    text = _SHORT.repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"(got {type(value).__name__} {text})"


def check_fields(data: Mapping, allowed: Iterable[str], path: str, problems: Problems) -> None:
    """Record every key of ``data`` not in ``allowed``, with a spelling suggestion."""
    allowed = list(allowed)
    for key in data:
        if not isinstance(key, str):
            problems.add(path, f"field names must be strings {describe(key)}")
        elif key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            problems.add(path, f"unknown field '{key}'{hint}")


def check_mapping(value: Any, path: str, problems: Problems) -> dict | Any:
    if not isinstance(value, Mapping):
        problems.add(path, f"must be a mapping {describe(value)}")
        return BAD
    return dict(value)


def check_list(value: Any, path: str, problems: Problems, *, nonempty: bool = False) -> list | Any:
    # a string is iterable but is never what the user meant by a list
    if not isinstance(value, (list, tuple)):
        problems.add(path, f"must be a list {describe(value)}")
        return BAD
    if nonempty and not value:
        problems.add(path, "must not be empty")
        return BAD
    return list(value)


def check_int(value: Any, path: str, problems: Problems, lo: int | None = None, hi: int | None = None) -> int | Any:
    """An integer in ``[lo, hi]``; integral floats (Parquet columns with nulls) are accepted."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        problems.add(path, f"not an integer {describe(value)}")
        return BAD
    if isinstance(value, float):
        if not value.is_integer():
            problems.add(path, f"not an integer {describe(value)}")
            return BAD
        value = int(value)
    return _in_range(value, path, problems, lo, hi)


def check_number(value: Any, path: str, problems: Problems, lo: float | None = None) -> float | Any:
    """A finite real number; booleans are not numbers even though Python says so."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        problems.add(path, f"not a number {describe(value)}")
        return BAD
    if not math.isfinite(value):
        problems.add(path, f"not a finite number {describe(value)}")
        return BAD
    return _in_range(float(value), path, problems, lo, None)


def _in_range(value: Any, path: str, problems: Problems, lo: Any, hi: Any) -> Any:
    if lo is not None and value < lo:
        problems.add(path, f"must be >= {lo} {describe(value)}")
        return BAD
    if hi is not None and value > hi:
        problems.add(path, f"must be <= {hi} {describe(value)}")
        return BAD
    return value


def check_str(value: Any, path: str, problems: Problems, *, nonempty: bool = False,
              choices: Iterable[str] | None = None) -> str | Any:
    if not isinstance(value, str):
        problems.add(path, f"not a string {describe(value)}")
        return BAD
    if len(value) > MAX_PROMPT_CHARS:  # first: every check below reads the whole string
        problems.add(path, f"{len(value)} characters, more than {MAX_PROMPT_CHARS} (jobs.limits.MAX_PROMPT_CHARS; "
                           f"set LORA_FARM_MAX_PROMPT_CHARS for more) {describe(value)}")
        return BAD
    if nonempty and not value.strip():
        problems.add(path, "must not be empty")
        return BAD
    if (bad := lone_surrogate(value)) is not None:
        problems.add(path, f"not valid Unicode text: a lone UTF-16 surrogate at character {bad} "
                           "(no results table or file name can hold it)")
        return BAD
    if choices is not None and value not in choices:
        problems.add(path, f"must be one of {', '.join(choices)} {describe(value)}")
        return BAD
    return value


def check_bool(value: Any, path: str, problems: Problems) -> bool | Any:
    if not isinstance(value, bool):
        problems.add(path, f"not a boolean {describe(value)}")
        return BAD
    return value


def check_id(value: Any, path: str, problems: Problems) -> str | Any:
    """A job id that is safe as a file name on every filesystem and object store."""
    if not isinstance(value, str):
        problems.add(path, f"not a string {describe(value)}")
        return BAD
    if not ID_RE.match(value) or ".." in value:
        problems.add(path, f"invalid id {value!r}: use 1-128 of A-Z a-z 0-9 . _ -, "
                           "starting with a letter or digit, no '..'")
        return BAD
    return value


def check_size(value: Any, path: str, problems: Problems) -> int | Any:
    size = check_int(value, path, problems, MIN_SIZE, MAX_SIZE)
    if size is not BAD and size % SIZE_MULTIPLE:
        problems.add(path, f"must be a multiple of {SIZE_MULTIPLE} (got {size})")
        return BAD
    return size


#: The scalar per-job fields (also allowed in ``defaults`` and as matrix overrides).
SCALAR_CHECKS: dict[str, Callable[[Any, str, Problems], Any]] = {
    "negative_prompt": check_str,
    "seed": lambda v, p, pr: check_int(v, p, pr, 0, MAX_SEED),
    "steps": lambda v, p, pr: check_int(v, p, pr, 1, MAX_STEPS),
    "width": check_size,
    "height": check_size,
    "guidance": lambda v, p, pr: check_number(v, p, pr, 0),
    "priority": check_int,
}
JOB_FIELDS = ("id", "prompt", "loras", *SCALAR_CHECKS)


def check_scalars(raw: Mapping, names: Iterable[str], path: str, problems: Problems) -> dict:
    """The valid values among ``names`` present in ``raw`` (``None`` means absent)."""
    out = {}
    for name in names:
        if raw.get(name) is not None:
            value = SCALAR_CHECKS[name](raw[name], at(path, name), problems)
            if value is not BAD:
                out[name] = value
    return out


def check_defaults(value: Any, path: str, problems: Problems) -> dict:
    """``RENDER_DEFAULTS`` overridden by the manifest's ``defaults`` section."""
    merged = dict(RENDER_DEFAULTS)
    raw = check_mapping(value, path, problems)
    if raw is not BAD:
        check_fields(raw, SCALAR_CHECKS, path, problems)
        merged.update(check_scalars(raw, SCALAR_CHECKS, path, problems))
    return merged


def is_url(uri: str) -> bool:
    """True for ``proto://...`` and chained ``a::b://...`` URLs (kept as written)."""
    return "://" in uri or "::" in uri


def resolve_path(uri: str, base_dir: str | None) -> str:
    """``uri`` with a relative local path taken relative to ``base_dir`` (the manifest's dir).

    URLs and absolute paths are kept. When the manifest itself came from a URL, the base
    is that URL's directory, so ``loras/a.safetensors`` next to ``s3://b/m.yaml`` becomes
    ``s3://b/loras/a.safetensors``.
    """
    if is_url(uri):
        return uri
    uri = os.path.expanduser(uri)
    if os.path.isabs(uri) or not base_dir:
        return os.path.normpath(uri) if os.path.isabs(uri) else uri
    if is_url(base_dir):
        proto, _, rest = base_dir.partition("://")
        return f"{proto}://{posixpath.normpath(posixpath.join(rest, uri))}"
    return os.path.normpath(os.path.join(base_dir, uri))


def check_lora(value: Any, path: str, problems: Problems, base_dir: str | None) -> dict | Any:
    """One LoRA reference; a bare string is shorthand for ``{uri: STRING}``."""
    if isinstance(value, str):
        value = {"uri": value}
    raw = check_mapping(value, path, problems)
    if raw is BAD:
        return BAD
    start = len(problems)
    check_fields(raw, LORA_FIELDS, path, problems)
    out: dict[str, Any] = {"strength": 1.0, "sha256": None}
    if raw.get("uri") is None:
        problems.add(at(path, "uri"), "required")
    else:
        uri = check_str(raw["uri"], at(path, "uri"), problems, nonempty=True)
        out["uri"] = uri if uri is BAD else resolve_path(uri.strip(), base_dir)
        if uri is not BAD and (refused := cached_refusal(policy_for(base_dir), out["uri"])) is not None:
            problems.add(at(path, "uri"), f"refused by the farm's LoRA URI policy: {refused}")
    if raw.get("strength") is not None:
        out["strength"] = check_number(raw["strength"], at(path, "strength"), problems)
    if raw.get("sha256") is not None:
        sha = raw["sha256"]
        if not isinstance(sha, str) or not SHA256_RE.match(sha):
            problems.add(at(path, "sha256"), f"must be 64 hex digits {describe(sha)}")
        else:
            out["sha256"] = sha.lower()
    return out if len(problems) == start else BAD


def check_loras(value: Any, path: str, problems: Problems, base_dir: str | None) -> list | Any:
    items = check_list(value, path, problems)
    if items is BAD:
        return BAD
    loras = [check_lora(item, at(path, i), problems, base_dir) for i, item in enumerate(items)]
    return BAD if any(lora is BAD for lora in loras) else loras


def check_job(raw: Any, path: str, problems: Problems, defaults: Mapping, base_dir: str | None) -> dict | None:
    """A job's normalized fields (defaults applied, LoRA paths resolved) or None if invalid.

    The result has every render field plus ``loras`` (list of dicts) and ``id`` (None
    when the id is to be derived from the content).
    """
    raw = check_mapping(raw, path, problems)
    if raw is BAD:
        return None
    start = len(problems)
    check_fields(raw, JOB_FIELDS, path, problems)
    job = {**defaults, **check_scalars(raw, SCALAR_CHECKS, path, problems), "id": None, "loras": []}
    if raw.get("prompt") is None:
        problems.add(at(path, "prompt"), "required")
    else:
        job["prompt"] = check_str(raw["prompt"], at(path, "prompt"), problems, nonempty=True)
    if raw.get("loras") is not None:
        job["loras"] = check_loras(raw["loras"], at(path, "loras"), problems, base_dir)
    if raw.get("id") is not None:
        job["id"] = check_id(raw["id"], at(path, "id"), problems)
    return job if len(problems) == start else None


# ---- top-level sections ----------------------------------------------------------------
MODEL_FIELDS = ("backend", "path", "dtype", "args")
DTYPES = ("auto", "float32", "float16", "bfloat16")


def check_model(value: Any, path: str, problems: Problems, base_dir: str | None) -> dict:
    """``{backend, path?, dtype?, args?}``; ``path`` is required where the weights live on disk."""
    raw = check_mapping(value, path, problems)
    if raw is BAD:
        return {"backend": "tiny"}
    check_fields(raw, MODEL_FIELDS, path, problems)
    model: dict[str, Any] = {"backend": "tiny"}
    if "backend" in raw:
        model["backend"] = check_str(raw["backend"], at(path, "backend"), problems, choices=BACKENDS)
    if raw.get("path") is not None:
        where = check_str(raw["path"], at(path, "path"), problems, nonempty=True)
        model["path"] = where if where is BAD else resolve_path(where, base_dir)
    elif model["backend"] in PATH_BACKENDS:
        problems.add(at(path, "path"), f"required for backend '{model['backend']}'")
    if raw.get("dtype") is not None:
        model["dtype"] = check_str(raw["dtype"], at(path, "dtype"), problems, choices=DTYPES)
    if raw.get("args") is not None:
        # backend-specific keyword arguments, passed through unchecked
        model["args"] = check_mapping(raw["args"], at(path, "args"), problems)
    return model


def check_option(value: Any, spec: dataclasses.Field, path: str, problems: Problems) -> Any:
    """One farm option, checked against what its ``FarmOptions`` field declares: its type,
    ``choices`` and lower bound ``lo``."""
    # annotations are strings there ("from __future__ import annotations"): "float | None" -> "float"
    kind, choices, lo = str(spec.type).split(" |")[0], spec.metadata["choices"], spec.metadata["lo"]
    if kind == "str":
        return check_str(value, path, problems, choices=choices)
    if kind == "bool":
        return check_bool(value, path, problems)
    if kind == "int":
        return check_int(value, path, problems, lo)
    return check_number(value, path, problems, lo)


def check_options(value: Any, path: str, problems: Problems) -> FarmOptions:
    """The manifest's ``options`` as ``FarmOptions``: the defaults, overridden by every valid value."""
    raw = check_mapping(value, path, problems)
    if raw is BAD:
        return FarmOptions()
    specs = option_fields()
    check_fields(raw, [f.name for f in specs], path, problems)
    given = {}
    for spec in specs:
        if raw.get(spec.name) is not None:
            checked = check_option(raw[spec.name], spec, at(path, spec.name), problems)
            if checked is not BAD:
                given[spec.name] = checked
    return FarmOptions(**given)


def known_protocol(protocol: str) -> bool:
    import fsspec

    return protocol in fsspec.available_protocols()


def check_storage_options(value: Any, path: str, problems: Problems) -> dict:
    """``{protocol: {fsspec filesystem kwargs}}``; the kwargs themselves are fsspec's business."""
    raw = check_mapping(value, path, problems)
    if raw is BAD:
        return {}
    out = {}
    for protocol, opts in raw.items():
        where = at(path, str(protocol))
        if not isinstance(protocol, str) or not known_protocol(protocol):
            problems.add(where, "unknown fsspec protocol")
            continue
        opts = check_mapping(opts, where, problems)
        if opts is not BAD:
            out[protocol] = opts
    return out


def check_output(value: Any, path: str, problems: Problems, base_dir: str | None) -> str:
    """The output root: a URL kept as is (trailing ``/`` dropped) or a resolved local dir."""
    out = check_str(value, path, problems, nonempty=True)
    if out is BAD:
        return ""
    out = resolve_path(out.strip(), base_dir)
    if not is_url(out):
        return os.path.normpath(out)
    proto = out.split("::")[-1].partition("://")[0] if "://" in out else ""
    if proto and not known_protocol(proto):
        problems.add(path, f"unknown fsspec protocol '{proto}'")
    return out if out.endswith("://") else out.rstrip("/")
