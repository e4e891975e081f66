"""A real headless Chromium, driven over the DevTools protocol, for the tests of burnin's HTML pages.

`open_page(path)` loads a file in Debian's `chromium` (headless, its own throwaway profile, no network
needed: the pages are self-contained) and returns what a person would see and what the browser said:
console messages and uncaught exceptions, each `<figure>`'s size and drawn elements, and screenshots
(the whole page, and each figure alone) as PNG files.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

_FIGURES_JS = """
JSON.stringify(Array.from(document.querySelectorAll('figure')).map(f => {
  const r = f.getBoundingClientRect();
  const g = f.querySelector('svg, img');
  const gr = g ? g.getBoundingClientRect() : {width: 0, height: 0};
  return {id: f.id, x: r.left + window.scrollX, y: r.top + window.scrollY, width: r.width, height: r.height,
          graphic: g ? g.tagName.toLowerCase() : null, graphic_width: gr.width, graphic_height: gr.height,
          drawn: f.querySelectorAll('path, line, rect, circle, polygon, polyline, text, use').length,
          caption: (f.querySelector('figcaption') || {}).textContent || ''};
}))
"""


@dataclass
class Page:
    console: list[dict[str, Any]] = field(default_factory=list)     # every console message: level, text
    exceptions: list[str] = field(default_factory=list)              # uncaught exceptions
    figures: list[dict[str, Any]] = field(default_factory=list)
    screenshot: Path | None = None
    figure_shots: dict[str, Path] = field(default_factory=dict)
    title: str = ""

    @property
    def errors(self) -> list[str]:
        return self.exceptions + [m["text"] for m in self.console if m["level"] in ("error", "warning")]


class _DevTools:
    def __init__(self, ws_url: str):
        import websocket  # websocket-client

        self.ws = websocket.create_connection(ws_url, timeout=30, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)
        raise TimeoutError(method)

    def wait_for(self, method: str, timeout: float = 30) -> None:
        if any(e.get("method") == method for e in self.events):
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = json.loads(self.ws.recv())
            self.events.append(msg)
            if msg.get("method") == method:
                return
        raise TimeoutError(method)

    def close(self) -> None:
        self.ws.close()


def open_page(path: Path, shots: Path, width: int = 1280) -> Page:
    """Load `path` in headless Chromium; screenshots go to `shots` (created)."""
    assert CHROMIUM, "chromium is not installed (make sysdeps)"
    shots.mkdir(parents=True, exist_ok=True)
    profile = tempfile.mkdtemp(prefix="burnin-chromium-")
    proc = subprocess.Popen([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                             "--no-default-browser-check", "--disable-extensions", "--remote-debugging-port=0",
                             "--remote-debugging-address=127.0.0.1", f"--user-data-dir={profile}",
                             f"--window-size={width},900", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    tools = None
    try:
        port = None
        deadline = time.monotonic() + 60
        while port is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {proc.returncode} before listening")
            m = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
            if m:
                port = int(m.group(1))
        assert port is not None, "chromium did not say where DevTools listens"
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
        page_target = next(t for t in targets if t.get("type") == "page")
        tools = _DevTools(page_target["webSocketDebuggerUrl"])
        for domain in ("Page", "Runtime", "Log"):
            tools.call(f"{domain}.enable")
        tools.call("Page.navigate", url=path.resolve().as_uri())
        tools.wait_for("Page.loadEventFired")
        time.sleep(0.3)  # late console messages
        page = Page()
        page.title = tools.call("Runtime.evaluate", expression="document.title", returnByValue=True)["result"]["value"]
        figures = tools.call("Runtime.evaluate", expression=_FIGURES_JS, returnByValue=True)["result"]["value"]
        page.figures = json.loads(figures)
        metrics = tools.call("Page.getLayoutMetrics")
        size = metrics.get("cssContentSize") or metrics["contentSize"]
        shot = tools.call("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                          clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1})
        page.screenshot = shots / f"{path.stem}.png"
        page.screenshot.write_bytes(base64.b64decode(shot["data"]))
        for i, fig in enumerate(page.figures):
            if fig["width"] <= 0 or fig["height"] <= 0:
                continue
            clip = {"x": fig["x"], "y": fig["y"], "width": fig["width"], "height": fig["height"], "scale": 1}
            data = tools.call("Page.captureScreenshot", format="png", captureBeyondViewport=True, clip=clip)["data"]
            out = shots / f"{path.stem}-{fig['id'] or i}.png"
            out.write_bytes(base64.b64decode(data))
            page.figure_shots[fig["id"] or str(i)] = out
        for ev in tools.events:
            method, params = ev.get("method"), ev.get("params", {})
            if method == "Runtime.consoleAPICalled":
                text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
                page.console.append({"level": params.get("type"), "text": text})
            elif method == "Log.entryAdded":
                entry = params.get("entry", {})
                page.console.append({"level": entry.get("level"), "text": entry.get("text", "")})
            elif method == "Runtime.exceptionThrown":
                page.exceptions.append(params.get("exceptionDetails", {}).get("text", "exception"))
        return page
    finally:
        if tools is not None:
            tools.close()
        proc.kill()
        proc.wait(timeout=30)
        shutil.rmtree(profile, ignore_errors=True)


def ink(png: Path) -> float:
    """The share of a PNG's pixels that differ from its most common colour (0: a blank image)."""
    import numpy as np
    from matplotlib.image import imread

    img = imread(str(png))
    flat = (img[..., :3] * 255).round().astype(np.uint32).reshape(-1, 3)
    # one integer per colour: np.unique over a 1-D array sorts numbers, where `axis=0` over rows of
    # three took seconds per screenshot (28 s of the browser test)
    codes = flat[:, 0] << 16 | flat[:, 1] << 8 | flat[:, 2]
    _, counts = np.unique(codes, return_counts=True)
    return 1.0 - counts.max() / codes.shape[0]
