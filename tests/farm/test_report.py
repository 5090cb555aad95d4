"""`farm report`: the gallery's structure from hand-built rows, and the real page in headless
Chromium (every image loads; a screenshot of it is not blank)."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import time
from html.parser import HTMLParser

import pytest

from farm.cli import main as farm_main
from farm.report import render_html
from farm.screenshot import main as screenshot_main
from farm.screenshot import screenshot
from jobs.manifest import validate_manifest
from jobs.results import ResultRow, ResultsWriter
from workers.worker import RenderWorker

CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", "about:blank"]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """A real output dir: the plain RenderWorker (no Ray) renders 3 jobs, one fails."""
    out = str(tmp_path_factory.mktemp("out"))
    junk = os.path.join(out, "junk.safetensors")
    open(junk, "wb").write(b"junk" * 10)
    m = validate_manifest({"model": {"backend": "tiny"}, "defaults": {"steps": 2, "width": 64, "height": 64},
                           "output": out, "jobs": [{"prompt": "a <b>bold</b> cat", "seed": 1}, {"prompt": "dog", "seed": 2},
                                                   {"prompt": "bad", "loras": [{"uri": junk}]}]})
    w = RenderWorker(m.model, worker_id="w0", cache_dir=os.path.join(out, ".cache"))
    rows = w.render(list(m.jobs), out)  # ResultRows, as the dispatcher records them
    writer = ResultsWriter(out)
    writer.append(rows)
    writer.finalize()
    return out


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail("chromium is not installed: `make setup` installs Debian's chromium package")
    return path


async def images_in_page(ws_url: str, page_url: str) -> list[dict]:
    import aiohttp

    async with aiohttp.ClientSession() as s, s.ws_connect(ws_url, max_msg_size=0) as ws:
        ids = iter(range(1, 1000))

        async def call(method, **params):
            mid = next(ids)
            await ws.send_json({"id": mid, "method": method, "params": params})
            while True:
                msg = json.loads((await ws.receive()).data)
                if msg.get("id") == mid:
                    return msg.get("result", {})

        await call("Page.enable")
        await call("Page.navigate", url=page_url)
        expr = ("new Promise(r => { const done = () => r(JSON.stringify(Array.from(document.images).map(i => "
                "({src: i.getAttribute('src'), ok: i.complete && i.naturalWidth > 0})))); "
                "document.readyState === 'complete' ? done() : window.addEventListener('load', done); })")
        for _ in range(50):
            res = await call("Runtime.evaluate", expression=expr, awaitPromise=True, returnByValue=True)
            value = res.get("result", {}).get("value")
            if value:
                return json.loads(value)
            await asyncio.sleep(0.1)
        return []


def test_report_gallery_images_all_load(rendered):
    assert farm_main(["report", rendered]) == 0
    report = os.path.join(rendered, "report.html")
    page = open(report).read()
    assert "a &lt;b&gt;bold&lt;/b&gt; cat" in page, "prompts are escaped"
    assert "CorruptFileError" in page
    gallery = Gallery.of(page)
    assert all(s["header"] == ["seed", "no LoRA", "junk 1.0"] for s in gallery.sections), gallery.sections
    statuses = {s["prompt"]: [c["status"] for c in s["rows"][0]["cells"]] for s in gallery.sections}
    assert statuses == {"a <b>bold</b> cat": ["ok", "missing"], "dog": ["ok", "missing"], "bad": ["missing", "failed"]}
    profile = tempfile.mkdtemp(prefix="rf-chrome")
    proc = subprocess.Popen([chromium(), f"--user-data-dir={profile}", *CHROME_FLAGS],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        port_file = os.path.join(profile, "DevToolsActivePort")
        deadline = time.time() + 30
        while not os.path.exists(port_file) or not open(port_file).read().strip():
            assert time.time() < deadline and proc.poll() is None, "chromium did not start"
            time.sleep(0.2)
        port, path = open(port_file).read().split()[:2]
        import urllib.request

        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list"))
        ws = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        images = asyncio.run(images_in_page(ws, "file://" + report))
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        shutil.rmtree(profile, ignore_errors=True)
    assert len(images) == 2, images
    assert all(i["ok"] for i in images), images


class Gallery(HTMLParser):
    """The page's prompt tables as data: per section its prompt, header cells and rows of cells."""

    def __init__(self):
        super().__init__()
        self.sections: list[dict] = []
        self.tags: list[tuple[str, dict]] = []  # every start tag, to count elements
        self._text: list[str] | None = None
        self._where = ""
        self._part = ""

    @classmethod
    def of(cls, page: str) -> "Gallery":
        g = cls()
        g.feed(page)
        g.close()
        return g

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "section":
            self.sections.append({"prompt": "", "header": [], "rows": []})
        elif tag == "h2" and self.sections:
            self._text, self._where = [], "prompt"
        elif tag in ("thead", "tbody"):
            self._part = tag
        elif tag == "tr" and self._part == "tbody":
            self.sections[-1]["rows"].append({"seed": a.get("data-seed"), "cells": []})
        elif tag == "th" and self._part == "thead":
            self._text, self._where = [], "header"
        elif tag == "td":
            self.sections[-1]["rows"][-1]["cells"].append(
                {"col": a.get("data-col"), "status": a.get("data-status"), "jobs": [], "text": ""})
            self._text, self._where = [], "cell"
        elif tag == "figure" and self._where == "cell":
            self.sections[-1]["rows"][-1]["cells"][-1]["jobs"].append(a.get("data-job"))
        elif tag == "br" and self._where == "header":
            self._where = "header-hash"  # the content hash under a column's label

    def handle_data(self, data):
        if self._text is not None and self._where in ("prompt", "header", "cell"):
            self._text.append(data)

    def handle_endtag(self, tag):
        text = "".join(self._text or [])
        if tag == "h2" and self._where == "prompt":
            self.sections[-1]["prompt"], self._text = text, None
        elif tag == "th" and self._where.startswith("header"):
            self.sections[-1]["header"].append(text)
            self._text, self._where = None, ""
        elif tag == "td":
            self.sections[-1]["rows"][-1]["cells"][-1]["text"] = text
            self._text, self._where = None, ""


HOSTILE_URI = "evil/'><img src=x onerror=alert(2)>.safetensors"
HOSTILE_ERROR = "CorruptFileError: <img src=x onerror=alert(3)> & \"quotes\""


def hand_rows() -> list[ResultRow]:
    """2 prompts x 3 compositions, seed 7: one job missing (prompt 1, style alone), one failed.
    Ids sort the style jobs first and the base ones last: the base column must lead anyway."""
    style = json.dumps([{"uri": "s3://b/loras/style.safetensors", "strength": 0.8}])
    mix = json.dumps([{"uri": "loras/style.safetensors", "strength": 0.5}, {"uri": HOSTILE_URI, "strength": 1.0}])
    prompts = ["a red circle", "<script>alert(1)</script> & co"]

    def ok(job_id, prompt, loras, key):
        return ResultRow(job_id=job_id, status="ok", output_uri=f"/out/images/{job_id}.png", composition_key=key,
                         worker_id="w1", fetch_s=0.25, compose_s=0.5, render_s=1.25, lora_mode="merge",
                         prompt=prompt, seed=7, loras=loras)

    return [
        ok("a-p0", prompts[0], style, "feedc0de" * 2),
        ResultRow(job_id="b-p0", status="failed", error=HOSTILE_ERROR, prompt=prompts[0], seed=7, loras=mix),
        ok("b-p1", prompts[1], mix, "abcdef01" * 2),
        ok("c-p0", prompts[0], "[]", "base"),
        ok("c-p1", prompts[1], "[]", "base"),
    ]


def test_render_html_gallery_structure():
    page = render_html("/out", hand_rows())
    g = Gallery.of(page)
    assert [s["prompt"] for s in g.sections] == ["a red circle", "<script>alert(1)</script> & co"]
    labels = ["seed", "no LoRA", "style 0.8", "style 0.5 + '><img src=x onerror=alert(2)> 1.0"]
    assert [s["header"] for s in g.sections] == [labels, labels], "every table: the same columns, base first"
    assert [len(s["rows"]) for s in g.sections] == [1, 1] and g.sections[0]["rows"][0]["seed"] == "7"
    cells = [s["rows"][0]["cells"] for s in g.sections]
    assert [[c["col"] for c in row] for row in cells] == [["0", "1", "2"]] * 2
    assert [[c["status"] for c in row] for row in cells] == [["ok", "ok", "failed"], ["ok", "missing", "ok"]]
    assert [[c["jobs"] for c in row] for row in cells] == [[["c-p0"], ["a-p0"], ["b-p0"]], [["c-p1"], [], ["b-p1"]]]
    assert "style 0.8" in cells[0][1]["text"] and "fetch 0.25s" in cells[0][1]["text"] and "w1" in cells[0][1]["text"]
    assert "no LoRA" in cells[1][0]["text"] and cells[1][1]["text"] == ""
    assert HOSTILE_ERROR in cells[0][2]["text"], "the failed job's error stays visible in its cell"
    # hostile prompt, URI and error are text, never markup: 4 images (the ok jobs), no script
    assert [t for t, _ in g.tags].count("img") == 4 and "script" not in [t for t, _ in g.tags]
    assert all(not any(k.startswith("on") for k in a) for _, a in g.tags), "no event handler attribute"
    assert "4 ok, 1 failed, 3 composition(s)" in page


def test_render_html_cuts_long_errors_in_the_cell():
    rows = [ResultRow(job_id="x", status="failed", error="E" * 1500 + " tail", prompt="p", seed=1)]
    cell = Gallery.of(render_html("/out", rows)).sections[0]["rows"][0]["cells"][0]
    assert cell["status"] == "failed" and "E" * 200 in cell["text"] and " tail" not in cell["text"]


def test_screenshot_of_the_report_is_not_blank(rendered, tmp_path):
    from PIL import Image

    assert farm_main(["report", rendered]) == 0
    chromium()  # fails with the install hint when absent
    png = str(tmp_path / "shots" / "report.png")
    assert screenshot_main([os.path.join(rendered, "report.html"), png, "--width", "800", "--height", "600"]) == 0
    with Image.open(png) as img:
        assert img.size == (800, 600)
        extrema = img.convert("RGB").getextrema()
    assert any(lo != hi for lo, hi in extrema), extrema


def test_screenshot_names_a_missing_chromium(tmp_path):
    page = tmp_path / "p.html"
    page.write_text("<p>hi</p>")
    with pytest.raises(RuntimeError, match="no-such-chromium-xyz"):
        screenshot(str(page), str(tmp_path / "p.png"), chromium="no-such-chromium-xyz")


def test_render_html_orders_columns_as_the_matrix_ids_do():
    def row(job_id, name):
        return ResultRow(job_id=job_id, status="ok", output_uri=f"/out/images/{job_id}.png", prompt="p", seed=1,
                         loras=json.dumps([{"uri": f"{name}.safetensors", "strength": 1}]))

    # lexically "m-p0-l10" < "m-p0-l2"; as numbers l2 comes first (the manifest's lora_sets order)
    page = render_html("/out", [row("m-p0-l10", "ten"), row("m-p0-l2", "two"), row("m-p0-l1", "one")])
    assert Gallery.of(page).sections[0]["header"] == ["seed", "one 1.0", "two 1.0", "ten 1.0"]
