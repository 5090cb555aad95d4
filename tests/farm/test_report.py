"""`farm report` opened in real headless Chromium: every image of the gallery loads."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import time

import pytest

from farm.cli import main as farm_main
from jobs.manifest import validate_manifest
from jobs.results import ResultsWriter
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
    assert "CorruptFileError" in page and page.count("<section>") == 2  # base + failed group
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
