"""`farm report DIR`: an HTML gallery of results, readable at a glance.

One table per prompt: a row per seed, a column per composition (the LoRA set and its
strengths), "no LoRA" first, then the compositions in the order they first appear over
the jobs sorted by id (digit runs compared as numbers, so a matrix's ``p0-l2`` comes before
``p0-l10``: the manifest's lora_sets order). Every table has every column, in the same
order; a cell with no job of that composition for the prompt and seed stays empty. A
column is keyed by its LoRA list (like the scheduler's routing key), not by the content
hash, so a job that failed before composing still lands in its column. Everything that
comes from results (prompts, LoRA URIs, errors, ids) is escaped.
"""
from __future__ import annotations

import html
import json
import posixpath
import re
from collections import OrderedDict
from dataclasses import dataclass, field

from jobs.results import read_results
from jobs.rows import ResultRow, cap_text
from storage.output import write_bytes_atomic

#: Image width in the gallery (the demo renders 128x128: shown larger, smoothly scaled).
IMAGE_PX = 192
#: Characters of an error shown in its cell; the whole (already capped) error is its title.
ERROR_SHOWN = 300
BASE_LABEL = "no LoRA"

_STYLE = (
    "body{font-family:sans-serif;margin:1em;color:#222}"
    "table.gallery{border-collapse:collapse;margin-bottom:1.5em}"
    "th,td{border:1px solid #ddd;padding:4px;vertical-align:top}"
    f"thead th{{font-size:13px;max-width:{IMAGE_PX}px}}"
    "tbody th{font-size:12px;white-space:nowrap}"
    f"td{{width:{IMAGE_PX}px}}"
    f"figure{{margin:0;width:{IMAGE_PX}px;font-size:12px}}"
    f"img{{display:block;width:{IMAGE_PX}px;height:auto;image-rendering:auto}}"
    "figcaption small{display:block;color:#666;font-size:10px;overflow-wrap:anywhere}"
    "td.empty{background:#f6f6f6}"
    ".failed{color:#b00}.err{font-family:monospace;font-size:10px;overflow-wrap:anywhere}"
    ".hash{color:#999;font-size:10px;font-weight:normal}"
)


@dataclass
class Column:
    """One composition: the LoRA set (by URI, checksum and strength) its jobs asked for."""

    key: str
    label: str
    uris: tuple[str, ...] = ()
    hashes: set[str] = field(default_factory=set)  # composition_key of its rendered jobs


def _rel(output_root: str, uri: str) -> str:
    root = output_root.rstrip("/")
    return uri[len(root) + 1:] if uri.startswith(root + "/") else uri


def _strength(value) -> str:
    try:
        return str(round(float(value), 6) + 0.0)  # "0.8", "1.0": the manifest's numbers
    except (TypeError, ValueError):
        return str(value)


def _name(uri: str) -> str:
    base = posixpath.basename(str(uri).rstrip("/")) or str(uri)
    return base[: -len(".safetensors")] if base.endswith(".safetensors") else base


def _lora_items(row: ResultRow) -> list[dict] | None:
    """The row's LoRA list, or None when its ``loras`` cell is not a list of objects."""
    try:
        items = json.loads(row.loras or "[]")
    except ValueError:
        return None
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        return None
    return items


def column_of(row: ResultRow) -> Column:
    """The composition column a row belongs to, with its label ("style 0.8 + detail 1.0")."""
    items = _lora_items(row)
    if items is None:
        return Column(key="raw:" + str(row.loras), label=str(row.loras))
    if not items:
        return Column(key="", label=BASE_LABEL)
    key = json.dumps(sorted((str(i.get("uri", "")), str(i.get("sha256") or ""), _strength(i.get("strength", 1.0)))
                            for i in items), ensure_ascii=False)
    label = " + ".join(f"{_name(i.get('uri', ''))} {_strength(i.get('strength', 1.0))}" for i in items)
    return Column(key=key, label=label, uris=tuple(str(i.get("uri", "")) for i in items))


def _natural(job_id: str) -> tuple:
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.findall(r"\d+|\D+", job_id))


def gallery(rows) -> tuple[list[Column], "OrderedDict[str, dict[int, dict[str, list[ResultRow]]]]"]:
    """``(columns, {prompt: {seed: {column key: [rows]}}})``: base column first, then first
    appearance over the rows sorted by job id; prompts in first-appearance order too."""
    columns: OrderedDict[str, Column] = OrderedDict()
    prompts: OrderedDict[str, dict[int, dict[str, list[ResultRow]]]] = OrderedDict()
    for r in sorted(rows, key=lambda r: _natural(r.job_id)):
        col = column_of(r)
        col = columns.setdefault(col.key, col)
        if r.status == "ok" and r.composition_key:
            col.hashes.add(r.composition_key)
        prompts.setdefault(r.prompt, {}).setdefault(r.seed, {}).setdefault(col.key, []).append(r)
    ordered = sorted(columns.values(), key=lambda c: c.key != "")  # stable: base first, the rest as found
    return ordered, prompts


def _header(i: int, col: Column) -> str:
    title = "; ".join([*col.uris, *(f"composition {h}" for h in sorted(col.hashes))])
    return (f"<th data-col='{i}' title='{html.escape(title)}'>{html.escape(col.label)}"
            + "".join(f"<br><span class='hash'>{html.escape(h[:12])}</span>" for h in sorted(col.hashes) if h != "base")
            + "</th>")


def _figure(output_root: str, r: ResultRow, label: str) -> str:
    timings = (f"fetch {r.fetch_s:.2f}s · compose {r.compose_s:.2f}s · render {r.render_s:.2f}s"
               + (f" · {html.escape(r.lora_mode)}" if r.lora_mode else "")
               + (f" · {html.escape(r.worker_id)}" if r.worker_id else ""))
    caption = (f"<figcaption><span class='loras'>{html.escape(label)}</span>"
               f"<small>{html.escape(r.job_id)}<br>{timings}</small></figcaption>")
    if r.status == "ok":
        src = html.escape(_rel(output_root, r.output_uri))
        alt = html.escape(f"{r.prompt} · seed {r.seed} · {label}")
        return f"<figure data-job='{html.escape(r.job_id)}'><img src='{src}' alt='{alt}'>{caption}</figure>"
    shown = html.escape(cap_text(r.error, ERROR_SHOWN))
    return (f"<figure class='failed' data-job='{html.escape(r.job_id)}'>"
            f"<div class='err' title='{html.escape(r.error)}'>failed: {shown}</div>{caption}</figure>")


def _cell(output_root: str, i: int, col: Column, members: list[ResultRow]) -> str:
    if not members:
        return f"<td class='empty' data-col='{i}' data-status='missing'></td>"
    status = "ok" if all(r.status == "ok" for r in members) else "failed"
    figures = "".join(_figure(output_root, r, col.label) for r in members)
    return f"<td class='{status}' data-col='{i}' data-status='{status}'>{figures}</td>"


def render_html(output_root: str, rows) -> str:
    """The report page for ``rows`` (``ResultRow``s), images linked relative to ``output_root``."""
    rows = list(rows)
    columns, prompts = gallery(rows)
    ok = sum(r.status == "ok" for r in rows)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>lora-farm report</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>lora-farm report</h1><p class='summary'>{ok} ok, {len(rows) - ok} failed, "
        f"{len(columns)} composition(s), {len(prompts)} prompt(s)</p>",
    ]
    head = "<tr><th>seed</th>" + "".join(_header(i, c) for i, c in enumerate(columns)) + "</tr>"
    for p, (prompt, seeds) in enumerate(prompts.items()):
        parts.append(f"<section class='prompt' data-prompt='{p}'><h2>{html.escape(prompt)}</h2>"
                     f"<table class='gallery'><thead>{head}</thead><tbody>")
        for seed in sorted(seeds):
            cells = "".join(_cell(output_root, i, c, seeds[seed].get(c.key, [])) for i, c in enumerate(columns))
            parts.append(f"<tr data-seed='{seed}'><th>seed {seed}</th>{cells}</tr>")
        parts.append("</tbody></table></section>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(output_root: str, storage_options: dict | None = None) -> str:
    rows = read_results(output_root, storage_options)
    uri = output_root.rstrip("/") + "/report.html"
    write_bytes_atomic(uri, render_html(output_root, rows).encode(), storage_options)
    return uri
