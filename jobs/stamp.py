"""An image's identity in its own PNG, so a rerun can trust an image whose row was lost.

A driver killed after its workers wrote images but before its buffered rows reached a part
leaves images with no row. Each image the farm writes carries a ``tEXt`` chunk (keyword
``lora-farm``, right after ``IHDR``) naming its job and a hash of what determines the
picture (``render_id``: prompt, negative prompt, seed, size, steps, guidance, LoRAs by
checksum or URI with strengths, and the model). ``recover_rows`` reads back only the first
bytes of each image that has no row, and an image whose stamp matches its job (same id,
same content) becomes an ok row (``worker_id`` ``RECOVERED``) instead of a render; any
other (another prompt under the same id, no stamp) is rendered again.
"""
from __future__ import annotations

import json
import logging
import struct
import zlib
from typing import Any, Iterable, Mapping, Sequence

from .manifest import RENDER_FIELDS, Job, job_content_id
from .results import ResultRow, existing_images, image_uri
from .sources import filesystem

log = logging.getLogger("jobs.stamp")

STAMP_KEY = b"lora-farm"
RECOVERED = "recovered"  # the worker_id of a row recovered from its image's stamp
#: How much of an image is read to find its stamp (it sits right after the 33-byte header).
STAMP_READ_BYTES = 8192
_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def render_id(job: Job, model: Mapping[str, Any] | None) -> str:
    """``job_content_id`` of the job's render fields and LoRAs under ``model``."""
    fields = {name: getattr(job, name) for name in RENDER_FIELDS}
    fields["loras"] = [{"uri": r.uri, "strength": r.strength, "sha256": r.sha256} for r in job.loras]
    return job_content_id(fields, model)


def stamp_png(png: bytes, job: Job, model: Mapping[str, Any] | None, *, composition_key: str = "",
              lora_mode: str = "") -> bytes:
    """``png`` with the job's stamp chunk inserted after ``IHDR``."""
    if png[:8] != _SIGNATURE or png[12:16] != b"IHDR":
        raise ValueError("not a PNG with its IHDR first")
    doc = {"job_id": job.job_id, "render": render_id(job, model), "key": composition_key, "mode": lora_mode}
    data = STAMP_KEY + b"\0" + json.dumps(doc, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    chunk = struct.pack(">I", len(data)) + b"tEXt" + data + struct.pack(">I", zlib.crc32(b"tEXt" + data))
    end_ihdr = 8 + 8 + struct.unpack(">I", png[8:12])[0] + 4
    return png[:end_ihdr] + chunk + png[end_ihdr:]


def read_stamp(head: bytes) -> dict | None:
    """The stamp from the first bytes of a PNG; None when there is none (or it is damaged)."""
    if head[:8] != _SIGNATURE:
        return None
    at = 8
    while at + 8 <= len(head):
        length, kind = struct.unpack(">I", head[at : at + 4])[0], head[at + 4 : at + 8]
        body = head[at + 8 : at + 8 + length]
        if kind == b"IDAT" or len(body) < length or len(head) < at + 12 + length:
            return None  # pixels start (no stamp before them) or the read stopped short
        crc = struct.unpack(">I", head[at + 8 + length : at + 12 + length])[0]
        if kind == b"tEXt" and body.startswith(STAMP_KEY + b"\0") and crc == zlib.crc32(kind + body):
            try:
                doc = json.loads(body[len(STAMP_KEY) + 1 :].decode("ascii"))
            except ValueError:
                return None
            return doc if isinstance(doc, dict) else None
        at += 12 + length
    return None


def _head(url: str, storage_options: Mapping | None) -> bytes:
    fs, path = filesystem(url, storage_options)
    try:
        with fs.open(path, "rb") as f:
            return f.read(STAMP_READ_BYTES)
    except OSError as e:  # gone or unreadable: not recoverable, render it again
        log.debug("cannot read %s for its stamp: %s", url, e)
        return b""


def recover_rows(output_root: str, jobs: Sequence[Job], model: Mapping[str, Any] | None,
                 storage_options: Mapping | None = None, rows: Iterable[ResultRow] = (),
                 images: set[str] | None = None) -> list[ResultRow]:
    """Ok rows for ``jobs`` that have no row in ``rows`` but an image stamped as theirs.
    ``images``: the root's ``existing_images`` when the caller has listed them already."""
    have = {r.job_id for r in rows}
    if images is None:
        images = existing_images(output_root, storage_options)
    out = []
    for job in jobs:
        if job.job_id in have or job.job_id not in images:
            continue
        uri = image_uri(output_root, job.job_id)
        stamp = read_stamp(_head(uri, storage_options))
        if stamp is None or stamp.get("job_id") != job.job_id or stamp.get("render") != render_id(job, model):
            continue
        out.append(ResultRow.ok(job, output_uri=uri, composition_key=str(stamp.get("key") or ""), worker_id=RECOVERED,
                                fetch_s=0.0, compose_s=0.0, render_s=0.0, lora_mode=str(stamp.get("mode") or "")))
    return out


__all__ = ["stamp_png", "read_stamp", "render_id", "recover_rows", "RECOVERED", "STAMP_KEY", "STAMP_READ_BYTES"]
