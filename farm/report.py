"""`farm report DIR`: an HTML gallery of results, grouped by composition, with timings."""
from __future__ import annotations

import html
import json
import posixpath
from collections import OrderedDict

from jobs.results import read_results
from storage.output import write_bytes_atomic


def _rel(output_root: str, uri: str) -> str:
    root = output_root.rstrip("/")
    return uri[len(root) + 1:] if uri.startswith(root + "/") else uri


def _loras(row) -> str:
    try:
        items = json.loads(row.loras or "[]")
    except ValueError:
        return row.loras
    return ", ".join(f"{posixpath.basename(str(i.get('uri', '')))} × {i.get('strength', 1.0)}" for i in items) or "no LoRA"


def render_html(output_root: str, rows) -> str:
    groups: OrderedDict[str, list] = OrderedDict()
    for r in sorted(rows, key=lambda r: (r.composition_key or "~", r.job_id)):
        groups.setdefault(r.composition_key or "(failed before composition)", []).append(r)
    ok = sum(r.status == "ok" for r in rows)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>lora-farm report</title>",
        "<style>body{font-family:sans-serif;margin:1em}figure{display:inline-block;margin:.4em;width:200px;"
        "vertical-align:top;font-size:11px}img{width:200px;height:auto;border:1px solid #ccc}"
        ".failed{color:#b00}</style></head><body>",
        f"<h1>lora-farm report</h1><p>{ok} ok, {len(rows) - ok} failed, {len(groups)} composition(s)</p>",
    ]
    for key, members in groups.items():
        parts.append(f"<section><h2>{html.escape(key)}</h2><p>{html.escape(_loras(members[0]))}</p>")
        for r in members:
            caption = (f"<b>{html.escape(r.job_id)}</b><br>{html.escape(r.prompt)} · seed {r.seed}<br>"
                       f"fetch {r.fetch_s:.2f}s · compose {r.compose_s:.2f}s · render {r.render_s:.2f}s"
                       + (f" ({html.escape(r.lora_mode)})" if r.lora_mode else "") + f" · {html.escape(r.worker_id)}")
            if r.status == "ok":
                src = html.escape(_rel(output_root, r.output_uri))
                parts.append(f"<figure><img src='{src}' alt='{html.escape(r.job_id)}'><figcaption>{caption}</figcaption></figure>")
            else:
                parts.append(f"<figure class='failed'><figcaption>{caption}<br>{html.escape(r.error)}</figcaption></figure>")
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(output_root: str, storage_options: dict | None = None) -> str:
    rows = read_results(output_root, storage_options)
    uri = output_root.rstrip("/") + "/report.html"
    write_bytes_atomic(uri, render_html(output_root, rows).encode(), storage_options)
    return uri
