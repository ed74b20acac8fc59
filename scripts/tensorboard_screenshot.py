"""Screenshots of TensorBoard's own UI, taken by headless Chromium: what a user of a run sees (issue #21).

    python scripts/tensorboard_screenshot.py --logdir runs/maskrcnn/<run> --output shots/
    python scripts/tensorboard_screenshot.py --url http://localhost:6006 --output shots/ --tag-filter loss_box_reg

With ``--logdir`` it starts ``python -m tensorboard.main --logdir LOGDIR --host 127.0.0.1`` on a free
port, waits until its data API answers, and stops it at the end; with ``--url`` it uses a TensorBoard
already running. Then, in one headless Chromium (``--chromium``; default: the first of chromium,
chromium-browser, google-chrome on PATH), it opens three pages and writes one PNG each to ``--output``:

* ``timeseries_<filter>.png``: the TIME SERIES tab, tag filter ``--tag-filter`` (default ``loss_mask``:
  the ``compare/loss_mask`` card with train and val in two colours, ``loss/train_loss_mask``,
  ``loss/val_loss_mask`` and ``iter/loss_mask``), smoothing 0 and "Ignore outliers in chart scaling"
  off (per-epoch charts have a handful of points);
* ``images.png``: the IMAGES tab filtered to ``--image-filter`` (default ``images/predictions``: ground
  truth beside the predictions, one slider step per evaluated epoch), "Show actual image size" ticked
  (``--scaled-images``: not);
* ``text.png``: the TEXT tab filtered to ``--text-filter`` (default ``provenance|diagnostics``).

The URLs are TensorBoard's own deep links (``docs/TENSORBOARD.md``): ``?smoothing=0&tagFilter=<regex>#timeseries``
(query parameters ``smoothing``, ``tagFilter``, ``runFilter`` of the Time Series dashboard; ``forceSVG=true``
draws the charts as SVG, which needs no GPU). The IMAGES and TEXT dashboards take their tag filter from
the hash, ``#images&tagFilter=<regex>``. "Ignore outliers" has no URL parameter: it is a stored setting,
written into the page's ``localStorage`` (``_tb_global_settings.timeseries``) before the app starts.

Chromium is driven through the Chrome DevTools protocol over a pipe (``--remote-debugging-pipe``,
standard library only): each page is captured once what it shows has loaded (charts drawn, images
decoded, text rendered; at most ``--timeout`` seconds, then it is captured as it is, with a warning).
Exit 0, or 2 with one ``Error:`` line (no Chromium, TensorBoard did not start or answer).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import io
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
SETTINGS_KEY = "_tb_global_settings.timeseries"  # the Time Series settings in localStorage
SETTINGS = {"scalarSmoothing": 0, "ignoreOutliers": False}

# Every element of the page, shadow roots included (the IMAGES and TEXT dashboards are Polymer
# elements, whose contents live in shadow roots).
DEEP_ALL = """const deepAll = (selector, root = document) => {
  const found = [...root.querySelectorAll(selector)];
  for (const el of root.querySelectorAll('*')) if (el.shadowRoot) found.push(...deepAll(selector, el.shadowRoot));
  return found;
};"""


def with_deep_all(expression: str) -> str:
    """``expression`` evaluated where ``deepAll(selector)`` is defined (in a scope of its own, so it can
    be evaluated again and again)."""
    return f"(() => {{ {DEEP_ALL} return ({expression}); }})()"


class TensorBoardError(RuntimeError):
    """TensorBoard did not start, or did not answer in time."""


# ---------------------------------------------------------------------------------------- the server
def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(base: str, route: str, **params: Any) -> Any:
    """GET ``base + route`` (``params`` as the query string) and decode its JSON; never through a proxy."""
    url = base.rstrip("/") + route + ("?" + urllib.parse.urlencode(params) if params else "")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=10) as response:
        return json.loads(response.read().decode())


@contextlib.contextmanager
def serve_tensorboard(logdir: str | Path, *, port: int | None = None, timeout: float = 120.0,
                      log_path: str | Path | None = None, ready: Any = None) -> Iterator[str]:
    """Run ``tensorboard --logdir logdir`` on ``127.0.0.1:port`` (a free port by default) and yield its
    base URL once ``/data/runs`` answers (and ``ready(base)``, when given, returns true: e.g. "every tag
    loaded"); the server, and the data server it starts, are stopped when the block ends.

    Raises ``TensorBoardError`` with the end of TensorBoard's own output when it exits or does not
    answer within ``timeout`` seconds."""
    port = port or free_port()
    base = f"http://127.0.0.1:{port}"
    with contextlib.ExitStack() as stack:
        if log_path is None:
            log_path = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "tensorboard.log"
        log_path = Path(log_path)
        with log_path.open("w") as log:
            # A session of its own, so that the Rust data server it starts goes with it.
            proc = subprocess.Popen(
                [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1",
                 "--port", str(port), "--reload_interval", "1"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        try:
            deadline, last_error = time.monotonic() + timeout, None
            while True:
                if proc.poll() is not None:
                    raise TensorBoardError(f"tensorboard exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
                try:
                    get_json(base, "/data/runs")
                    if ready is None or ready(base):
                        break
                    last_error = f"it answers, but {getattr(ready, '__name__', 'ready')}() is still false"
                except OSError as err:  # not listening yet, or still loading
                    last_error = err
                if time.monotonic() > deadline:
                    raise TensorBoardError(f"tensorboard on {base} not ready within {timeout:.0f} s "
                                           f"({last_error}):\n{log_path.read_text()[-3000:]}")
                time.sleep(0.5)
            yield base
        finally:
            stop_process_group(proc)


def stop_process_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process group ``proc`` leads (started with ``start_new_session=True``), SIGKILL after ``grace`` s."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=grace)


# ----------------------------------------------------------------------------------------- the pages
def timeseries_url(base: str, tag_filter: str) -> str:
    """The TIME SERIES tab with a tag filter (a regex) and smoothing 0, charts as SVG."""
    query = urllib.parse.urlencode({"smoothing": 0, "tagFilter": tag_filter, "forceSVG": "true"})
    return f"{base.rstrip('/')}/?{query}#timeseries"


def dashboard_url(base: str, plugin: str, tag_filter: str) -> str:
    """A legacy (Polymer) dashboard, ``images`` or ``text``, with its tag filter in the hash."""
    return f"{base.rstrip('/')}/#{plugin}&tagFilter={urllib.parse.quote(tag_filter, safe='')}"


# What each page shows, as a JavaScript expression (``deepAll`` is defined): null while it is still
# loading, else a summary of what is drawn; a page is captured once two polls give the same summary.
TIMESERIES_STATE = """(() => {
  const cards = deepAll('scalar-card, image-card, histogram-card');
  const visible = el => el.offsetParent !== null;
  if (!cards.length || cards.some(c => [...c.querySelectorAll('mat-spinner, mat-progress-bar')].some(visible))) return null;
  return cards.map(c => c.querySelectorAll('svg path, img').length);
})()"""
IMAGES_STATE = """(() => {
  const imgs = deepAll('img').filter(img => img.src.includes('/individualImage'));
  if (!imgs.length || imgs.some(img => !img.complete || img.naturalWidth === 0)) return null;
  return imgs.map(img => img.src);
})()"""
# The IMAGES tab scales each picture down to its card; at actual size the captions are legible.
IMAGES_ACTUAL_SIZE = """(() => {
  const box = deepAll('paper-checkbox').find(c => c.textContent.includes('actual image size'));
  if (box && !box.checked) box.click();
  return Boolean(box);
})()"""
TEXT_STATE = """(() => {
  const blocks = deepAll('tf-markdown-view').map(view =>
    (view.shadowRoot || view).querySelectorAll('table, p, pre, li').length);
  return blocks.some(n => n > 0) ? blocks : null;
})()"""


# ---------------------------------------------------------------------------------------- the browser
def find_chromium(explicit: str | None = None) -> str | None:
    """``explicit`` if given, else the first of ``CHROMIUM_NAMES`` on PATH (or None)."""
    if explicit:
        return shutil.which(explicit) or (explicit if Path(explicit).is_file() else None)
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


PIPE_EXEC = ("import os, sys; r, w = int(sys.argv[1]), int(sys.argv[2]); os.dup2(r, 3); os.dup2(w, 4); "
             "os.close(r); os.close(w); os.execv(sys.argv[3], sys.argv[3:])")


def _moved_above(fd: int, lowest: int) -> int:
    """``fd`` duplicated to a number >= ``lowest`` (not inherited), the original closed."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, lowest)
    os.close(fd)
    return moved


class Chromium:
    """One headless Chromium driven through the DevTools protocol over a pipe: Chromium reads
    NUL-terminated JSON commands on its fd 3 and writes replies and events on its fd 4."""

    def __init__(self, binary: str, width: int = 1600, height: int = 1000):
        self.width, self.height = width, height
        self._profile = tempfile.TemporaryDirectory(prefix="tb-screenshot-")
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        # Chromium's ends moved above fd 9, so that placing them at 3 and 4 cannot overwrite either.
        to_chrome_r, from_chrome_w = (_moved_above(fd, 10) for fd in (to_chrome_r, from_chrome_w))
        args = [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--mute-audio",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--remote-debugging-pipe",
                f"--user-data-dir={self._profile.name}", f"--window-size={width},{height}", "about:blank"]
        # A small Python moves the two pipe ends to fds 3 and 4, where Chromium expects them, and
        # becomes Chromium (a shell would do, but dash takes single-digit fds only).
        self._log = Path(self._profile.name) / "chromium.log"
        with self._log.open("w") as log:
            self._proc = subprocess.Popen([sys.executable, "-c", PIPE_EXEC, str(to_chrome_r), str(from_chrome_w), *args],
                                          pass_fds=(to_chrome_r, from_chrome_w), stdin=subprocess.DEVNULL,
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer, self._next_id = b"", 0
        try:
            self.session = self._attach()
        except BaseException:
            self.close()
            raise

    def _attach(self) -> str:
        targets = self.send("Target.getTargets")["targetInfos"]
        page = next((t for t in targets if t["type"] == "page"), None)
        target_id = page["targetId"] if page else self.send("Target.createTarget", url="about:blank")["targetId"]
        session = self.send("Target.attachToTarget", targetId=target_id, flatten=True)["sessionId"]
        self.send("Page.enable", session=session)
        self.send("Runtime.enable", session=session)
        self.send("Emulation.setDeviceMetricsOverride", session=session, width=self.width, height=self.height,
                  deviceScaleFactor=1, mobile=False)
        return session

    def _read_message(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while b"\0" not in self._buffer:
            if time.monotonic() > deadline:
                raise TimeoutError("no reply from Chromium")
            readable, _, _ = select.select([self._from_chrome], [], [], 0.5)
            if readable:
                chunk = os.read(self._from_chrome, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"Chromium closed its pipe (exit code {self._proc.poll()}):\n{self.log_tail()}")
                self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, session: str | None = None, timeout: float = 60.0, **params: Any) -> dict:
        """One protocol command; returns its result (events in between are dropped)."""
        self._next_id += 1
        command = {"id": self._next_id, "method": method, "params": params}
        if session:
            command["sessionId"] = session
        try:
            os.write(self._to_chrome, json.dumps(command).encode() + b"\0")
        except BrokenPipeError:
            raise RuntimeError(f"Chromium is gone (exit code {self._proc.poll()}):\n{self.log_tail()}") from None
        while True:
            message = self._read_message(timeout)
            if message.get("id") == self._next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def log_tail(self, chars: int = 2000) -> str:
        """The end of Chromium's own output."""
        try:
            return self._log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript ``expression`` in the page; a ``RuntimeError`` if it throws."""
        result = self.send("Runtime.evaluate", session=self.session, expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise RuntimeError(details.get("exception", {}).get("description") or details.get("text"))
        return result.get("result", {}).get("value")

    def open(self, url: str) -> None:
        self.send("Page.navigate", session=self.session, url=url)

    def wait_for(self, expression: str, timeout: float, settle: float = 1.5) -> bool:
        """Poll ``expression`` (``deepAll`` defined) until it gives the same non-null value twice,
        ``settle`` s apart (what the page shows has stopped changing); False after ``timeout`` s."""
        deadline, previous = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            try:
                now = self.evaluate(with_deep_all(expression))
            except RuntimeError:  # the page is navigating
                now = None
            if now is not None and now == previous:
                return True
            previous = now
            time.sleep(settle if now is not None else 0.5)
        return False

    def screenshot(self, path: str | Path, palette: bool = False) -> Path:
        """The viewport as a PNG; ``palette``: 256 colours (about a third of the bytes, for docs)."""
        data = base64.b64decode(self.send("Page.captureScreenshot", session=self.session, format="png")["data"])
        path = Path(path)
        if palette:
            from PIL import Image

            image = Image.open(io.BytesIO(data)).convert("RGB")
            image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)
        else:
            path.write_bytes(data)
        return path

    def close(self) -> None:
        with contextlib.suppress(OSError, RuntimeError, TimeoutError):
            self.send("Browser.close", timeout=5)
        for fd in (self._to_chrome, self._from_chrome):
            with contextlib.suppress(OSError):
                os.close(fd)
        stop_process_group(self._proc, grace=5)
        self._profile.cleanup()

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def store_settings(browser: Chromium, base: str, settings: dict[str, Any]) -> None:
    """Write the Time Series settings into the TensorBoard origin's localStorage (read when the app starts)."""
    browser.open(base.rstrip("/") + "/this-page-does-not-exist")  # same origin, the app not started
    browser.wait_for("document.readyState === 'complete' || null", timeout=30, settle=0.2)
    browser.evaluate(f"localStorage.setItem({json.dumps(SETTINGS_KEY)}, {json.dumps(json.dumps(settings))})")


def take_screenshots(base: str, output: str | Path, *, chromium: str, tag_filter: str = "loss_mask",
                     image_filter: str = "images/predictions", text_filter: str = "provenance|diagnostics",
                     width: int = 1600, height: int = 1000, timeout: float = 60.0, palette: bool = False,
                     scaled_images: bool = False) -> list[Path]:
    """Capture the three pages (module docstring) of the TensorBoard at ``base`` into ``output``;
    returns the PNG paths. A page not loaded within ``timeout`` s is captured as it is, with a warning."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in tag_filter)
    pages = [  # (file, URL, what shows when loaded, what to click then)
        (f"timeseries_{safe}.png", timeseries_url(base, tag_filter), TIMESERIES_STATE, None),
        ("images.png", dashboard_url(base, "images", image_filter), IMAGES_STATE,
         None if scaled_images else IMAGES_ACTUAL_SIZE),
        ("text.png", dashboard_url(base, "text", text_filter), TEXT_STATE, None),
    ]
    written = []
    with Chromium(chromium, width, height) as browser:
        store_settings(browser, base, SETTINGS)
        for name, url, ready, action in pages:
            browser.open(url)
            loaded = browser.wait_for(ready, timeout)
            if loaded and action is not None:
                browser.evaluate(with_deep_all(action))
                loaded = browser.wait_for(ready, timeout)
            if not loaded:
                print(f"WARNING: {url} had not finished loading after {timeout:.0f} s; captured as it is", file=sys.stderr)
            written.append(browser.screenshot(output / name, palette=palette))
            print(f"{output / name}  <-  {url}")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--logdir", help="start TensorBoard on this folder (a run, a sweep or a runs folder)")
    where.add_argument("--url", help="use the TensorBoard running at this URL, e.g. http://localhost:6006")
    parser.add_argument("--output", "-o", default="tensorboard_screenshots", help="folder for the PNGs")
    parser.add_argument("--tag-filter", default="loss_mask", help="Time Series tag filter (regex; default loss_mask)")
    parser.add_argument("--image-filter", default="images/predictions", help="IMAGES tag filter (regex)")
    parser.add_argument("--text-filter", default="provenance|diagnostics", help="TEXT tag filter (regex)")
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--height", type=int, default=1000)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each page to load")
    parser.add_argument("--scaled-images", action="store_true",
                        help="IMAGES as TensorBoard shows them first, scaled to the cards (default: actual size)")
    parser.add_argument("--palette", action="store_true", help="write 256-colour PNGs (smaller, for docs)")
    parser.add_argument("--chromium", help="the browser binary (default: chromium, chromium-browser or google-chrome on PATH)")
    args = parser.parse_args(argv)

    chromium = find_chromium(args.chromium)
    if chromium is None:
        print(f"Error: no browser found ({args.chromium or ', '.join(CHROMIUM_NAMES)}); install Chromium or pass --chromium",
              file=sys.stderr)
        return 2
    options = {"chromium": chromium, "tag_filter": args.tag_filter, "image_filter": args.image_filter,
               "text_filter": args.text_filter, "width": args.width, "height": args.height, "timeout": args.timeout,
               "palette": args.palette, "scaled_images": args.scaled_images}
    try:
        if args.url:
            get_json(args.url, "/data/runs")
            take_screenshots(args.url, args.output, **options)
        else:
            if not Path(args.logdir).is_dir():
                print(f"Error: --logdir {args.logdir} is not a folder", file=sys.stderr)
                return 2
            with serve_tensorboard(args.logdir) as base:
                take_screenshots(base, args.output, **options)
    except (OSError, RuntimeError) as err:  # TensorBoard or Chromium did not start or answer
        print(f"Error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
