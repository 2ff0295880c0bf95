"""The demo's page in a real browser: headless Chromium driven over the DevTools protocol on a pipe (no extra Python
package). The page loads without console errors, its sliders change the plot, hovering singles out one curve, and
nothing scrolls sideways at a phone's width of 390 px.

Skipped only when Chromium is absent and ``CI`` is not set; under CI (where ``.ci/run`` installs Debian's chromium)
a missing browser is a failure."""

from __future__ import annotations

import contextlib
import io
import json
import os
import queue
import shutil
import subprocess
import threading
import time

import pytest

from adamkit.demo import run

BROWSER = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
if BROWSER is None and not os.environ.get("CI"):
    pytest.skip("no Chromium on this machine (CI installs it)", allow_module_level=True)


class DevTools:
    """A minimal Chrome DevTools Protocol client over ``--remote-debugging-pipe`` (fd 3 in, fd 4 out)."""

    def __init__(self, profile: str) -> None:
        assert BROWSER, "Chromium is required under CI"
        to_child, self._to_child = os.pipe()
        self._from_child, from_child = os.pipe()
        cmd = (f'exec "{BROWSER}" --headless=new --remote-debugging-pipe --no-sandbox --disable-gpu '
               f'--no-first-run --user-data-dir="{profile}" about:blank 3<&{to_child} 4>&{from_child}')
        self.proc = subprocess.Popen(["bash", "-c", cmd], pass_fds=(to_child, from_child),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_child)
        os.close(from_child)
        self.events: list[dict] = []
        self._inbox: queue.Queue = queue.Queue()
        self._next = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        buf = b""
        while chunk := os.read(self._from_child, 1 << 16):
            buf += chunk
            *messages, buf = buf.split(b"\0")
            for m in messages:
                self._inbox.put(json.loads(m))

    def wait(self, test, timeout: float = 30.0) -> dict:
        """Read messages (keeping every event) until one satisfies ``test``."""
        end = time.monotonic() + timeout
        while True:
            message = self._inbox.get(timeout=max(end - time.monotonic(), 0.01))
            if "method" in message:
                self.events.append(message)
            if test(message):
                return message

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._next += 1
        message = {"id": self._next, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_child, json.dumps(message).encode() + b"\0")
        reply = self.wait(lambda m, i=self._next: m.get("id") == i)
        assert "error" not in reply, reply
        return reply["result"]

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        os.close(self._to_child)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """The report of two sections with interactive figures, opened at 390 px wide."""
    folder = tmp_path_factory.mktemp("report")
    with contextlib.redirect_stdout(io.StringIO()):
        index, _, _ = run(folder, only=["lineage", "averages"], quick=True, verbose=False)
    tools = DevTools(str(tmp_path_factory.mktemp("profile")))
    try:
        target = tools.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = tools.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for method in ("Runtime.enable", "Log.enable", "Page.enable"):
            tools.send(method, session=session)
        tools.send("Emulation.setDeviceMetricsOverride", {"width": 390, "height": 844, "deviceScaleFactor": 2,
                                                           "mobile": True}, session)
        tools.send("Page.navigate", {"url": index.resolve().as_uri()}, session)
        tools.wait(lambda m: m.get("method") == "Page.loadEventFired")

        def evaluate(expression: str):
            result = tools.send("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session)
            assert "exceptionDetails" not in result, result
            return result["result"].get("value")

        yield tools, evaluate
    finally:
        tools.close()


def test_no_console_errors(page):
    tools, evaluate = page
    assert evaluate("document.querySelectorAll('.explore').length") == 2
    errors = [e for e in tools.events
              if e["method"] == "Runtime.exceptionThrown"
              or (e["method"] == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))
              or (e["method"] == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
    assert errors == []
    # the script ran: every interactive figure drew its panels and hid its fallback PNG
    assert evaluate("document.querySelectorAll('.explore.nojs').length") == 0
    assert evaluate("document.querySelectorAll('.explore svg polyline[data-name]').length") > 10


SLIDE = """(() => {
  const fig = document.getElementById(%s), input = fig.querySelectorAll('input[type=range]')[%d];
  const before = [...fig.querySelectorAll('polyline[data-name]')].map(p => p.getAttribute('points')).join();
  input.value = String((+input.value + 1) %% (+input.max + 1));
  input.dispatchEvent(new Event('input'));
  const after = [...fig.querySelectorAll('polyline[data-name]')].map(p => p.getAttribute('points')).join();
  return [before.length, after.length, before === after];
})()"""


@pytest.mark.parametrize("figure, slider", [("explore-trajectories", 0), ("explore-trajectories", 1),
                                            ("explore-trajectories", 2), ("explore-averages", 0),
                                            ("explore-averages", 1)])
def test_slider_changes_the_plot(page, figure, slider):
    _, evaluate = page
    before, after, same = evaluate(SLIDE % (json.dumps(figure), slider))
    assert before > 0 and after > 0
    assert not same


def test_hover_highlights_one_optimizer(page):
    _, evaluate = page
    dimmed = evaluate("""(() => {
      const fig = document.getElementById('explore-trajectories');
      const item = fig.querySelector('.legend span[data-name="Adam"]');
      item.dispatchEvent(new Event('mouseenter'));
      const lines = [...fig.querySelectorAll('polyline[data-name]')];
      const result = lines.map(l => [l.dataset.name, l.classList.contains('dim')]);
      item.dispatchEvent(new Event('mouseleave'));
      return result;
    })()""")
    assert dimmed and all(dim == (name != "Adam") for name, dim in dimmed)


def test_nothing_scrolls_sideways_at_390px(page):
    _, evaluate = page
    assert evaluate("window.innerWidth") == 390
    assert evaluate("document.documentElement.scrollWidth") <= 390
    # wide tables scroll inside their own box instead of the page
    assert evaluate("[...document.querySelectorAll('table')].every(t => t.closest('.scroll'))")


def test_a_click_enlarges_a_figure(page):
    _, evaluate = page
    shown = evaluate("""(() => {
      const img = document.querySelector('figure .pan img'), zoom = document.getElementById('zoom');
      const before = getComputedStyle(zoom).display;
      img.click();
      const after = [getComputedStyle(zoom).display, zoom.querySelector('img').src === img.src];
      zoom.click();
      return [before, ...after, getComputedStyle(zoom).display];
    })()""")
    assert shown == ["none", "block", True, "none"]
