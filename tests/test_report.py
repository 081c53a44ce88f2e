"""The dataset report: files and numbers, and the page as a real browser shows it (headless Debian Chromium).

The browser is driven over the Chrome DevTools Protocol on a pipe (``--remote-debugging-pipe``: NUL-terminated JSON
on file descriptors 3 and 4), so the test needs only the standard library. When ``/usr/bin/chromium`` is missing
the session installs it with apt (CI starts bare and runs as root); it skips only when apt cannot reach a mirror.
The screenshot lands in ``$MMDATA_ARTIFACTS`` (default: this session's pytest temp folder); its path is printed.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
from tests.conftest import jpeg_bytes, png_bytes, write_recipe

import mmdata
from mmdata.cli import main
from mmdata.report import smart_resize_tokens, write_report
from mmdata.summary import format_summary

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
                  "--hide-scrollbars", "--mute-audio", "--remote-debugging-pipe"]
APT_PACKAGES = ["chromium", "fonts-wqy-microhei"]  # a small CJK font so Chinese text renders in the screenshot
NO_NETWORK = ("Temporary failure resolving", "Could not resolve", "Failed to fetch", "Unable to fetch",
              "Network is unreachable", "Could not connect", "Connection failed", "No address associated")
HOSTILE = "<script>document.title='pwned'</script><img src=x onerror=alert(1)>"


# ----------------------------------------------------------------------------------------------- the build


def _record(i: int, source: str, image: str | None) -> dict:
    if source == "zh":
        question, answer = f"<image>这张图片里是什么颜色?第{i}题", f"这是一个红色的方块,编号 {i}。" * (1 + i % 3)
    else:
        question, answer = f"<image>What is in picture {i}?", f"A coloured square, number {i}. " * (1 + i % 4)
    if i % 3 == 1:
        answer = HOSTILE + " " + answer
    record = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
              "images": [image] if image else []}
    if i % 5 == 0:  # a second round
        record["messages"] += [{"role": "user", "content": "再说一遍?" if source == "zh" else "Again?"},
                               {"role": "assistant", "content": answer}]
    return record


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory) -> Path:
    """30 rows, a mixture of two sources (Chinese and English), JPEG/PNG images of several sizes, one missing image and one
    text-only row with required images (two rejects), HTML-injection answers, and a 3-record val split."""
    root = tmp_path_factory.mktemp("report_build")
    (root / "img").mkdir()
    rows: dict[str, list[dict]] = {"zh": [], "en": []}
    for i in range(30):
        size = [(64, 48), (320, 240), (1200, 800), (900, 1600)][i % 4]
        if i % 3:
            (root / "img" / f"{i}.jpg").write_bytes(jpeg_bytes(size, color=(20 * (i % 12), 80, 160)))
            image = f"img/{i}.jpg"
        else:
            (root / "img" / f"{i}.png").write_bytes(png_bytes(size, color=(200, 40 + 5 * i, 40)))
            image = f"img/{i}.png"
        if i == 11:
            image = "img/missing.jpg"
        if i == 23:
            image = None
        source = "zh" if i % 2 else "en"
        rows[source].append(_record(i, source, image))
    components = []
    for source, records in rows.items():
        (root / f"{source}.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n",
                                              encoding="utf-8")
        components.append({"name": source, "source": {"type": "jsonl", "path": f"{source}.jsonl"},
                           "count": len(records)})
    recipe = write_recipe(root / "recipe.yaml", {
        "name": "report_demo", "source": {"type": "mixture", "seed": 5, "components": components},
        "filters": {"require_images": True}, "split": {"val": 3, "seed": 1},
        "output": {"dir": str(root / "out")}})
    result = mmdata.build(str(recipe), num_proc=1)
    assert (result.read, result.written, result.rejected) == (30, 28, 2)
    return result.output_dir


@pytest.fixture(scope="module")
def report(build_dir) -> Path:
    return write_report(build_dir, samples=12, seed=0)


def manifest_counts(build_dir: Path) -> dict:
    return json.loads((build_dir / "mmdata_build.json").read_text(encoding="utf-8"))["counts"]


# ----------------------------------------------------------------------------------------------- files and numbers


def test_report_writes_page_stats_and_plots(build_dir, report):
    assert report == build_dir / "report" / "index.html"
    stats = json.loads((build_dir / "report" / "stats.json").read_text(encoding="utf-8"))
    assert stats["counts"] == manifest_counts(build_dir)
    assert stats["counts"]["by_source"] == {"en": 15, "zh": 13}
    assert stats["sample"] == {"size": 28, "of": 28, "seed": 0, "max_records": 10_000}
    for plot in stats["plots"]:
        assert (build_dir / "report" / plot).read_bytes().startswith(b"\x89PNG")
    assert {Path(p).name for p in stats["plots"]} >= {"text_chars.png", "text_tokens.png", "image_size.png",
                                                      "file_size.png", "image_tokens.png", "turns.png"}
    dist = stats["distributions"]
    assert dist["width"]["max"] == 1200 and dist["height"]["max"] == 1600  # read from headers
    assert dist["turns"]["min"] == 1 and dist["turns"]["max"] == 2
    cutoff = stats["recommendations"]["cutoff_len"]
    assert cutoff["value"] >= cutoff["p99_tokens"] and cutoff["value"] % 64 == 0
    by_budget = {row["image_max_pixels"]: row for row in stats["recommendations"]["image_max_pixels"]}
    # rows i % 4 == 2 are 1200x800 (7 written), rows i % 4 == 3 are 900x1600 (5 written: rows 11 and 23 were rejected)
    assert by_budget[512 * 512]["records_downscaled"] == 12
    assert by_budget[1024 * 1024]["records_downscaled"] == 5  # only 900x1600 is above 1024*1024


def test_page_escapes_record_text(report):
    page = report.read_text(encoding="utf-8")
    assert HOSTILE not in page and "&lt;script&gt;document.title=" in page
    assert "<script" not in page  # the report itself needs no script either


def test_statistics_come_from_a_bounded_seeded_sample(build_dir, tmp_path):
    copy = shutil.copytree(build_dir, tmp_path / "b")
    write_report(copy, samples=4, seed=3, max_records=10)
    stats = json.loads((copy / "report" / "stats.json").read_text(encoding="utf-8"))
    assert stats["sample"]["size"] == 10 and stats["counts"] == manifest_counts(build_dir)
    assert "sample of 10" in (copy / "report" / "index.html").read_text(encoding="utf-8")
    first = (copy / "report" / "stats.json").read_text(encoding="utf-8")
    write_report(copy, samples=4, seed=3, max_records=10)
    assert (copy / "report" / "stats.json").read_text(encoding="utf-8") == first  # seeded: same numbers


def test_qwen2_vl_image_tokens():
    assert smart_resize_tokens(224, 224) == 64  # 8x8 blocks of 28 pixels
    assert smart_resize_tokens(1000, 1000) == 27 * 27  # scaled to 768x768 first, then snapped to 756x756
    # Qwen2-VL-*-Instruct's processor allows up to 12845056 pixels: 1008x1008 stays
    assert smart_resize_tokens(1000, 1000, max_pixels=1024 * 1024) == 36 * 36
    assert smart_resize_tokens(10, 10) == 4  # tiny images are scaled up to the processor's 56x56 minimum


def test_cli_report_and_build_summary(build_dir, tmp_path, capsys):
    copy = shutil.copytree(build_dir, tmp_path / "b")
    assert main(["report", str(copy), "--samples", "2"]) == 0
    assert f"report: {copy / 'report' / 'index.html'}" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "nothing")]) == 6
    assert "no mmdata_build.json" in capsys.readouterr().err


def test_recipe_report_option_writes_report_after_build(tmp_path):
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes())
    (tmp_path / "data.jsonl").write_text(json.dumps({"messages": [
        {"role": "user", "content": "<image>颜色?"}, {"role": "assistant", "content": "红色"}], "images": ["a.jpg"]},
        ensure_ascii=False) + "\n", encoding="utf-8")
    recipe = write_recipe(tmp_path / "r.yaml", {"name": "tiny", "source": {"type": "jsonl", "path": "data.jsonl"},
                                                "report": True, "output": {"dir": str(tmp_path / "out")}})
    result = mmdata.build(str(recipe), num_proc=1)
    assert result.report == tmp_path / "out" / "report" / "index.html" and result.report.is_file()
    summary = format_summary(result)
    assert "read 1  written 1  rejected 0" in summary and f"report: {result.report}" in summary


def test_build_with_every_row_rejected_still_reports_its_counts(tmp_path):
    (tmp_path / "data.jsonl").write_text(json.dumps({"messages": [
        {"role": "user", "content": "<image>?"}, {"role": "assistant", "content": "x"}], "images": ["gone.jpg"]})
        + "\n", encoding="utf-8")
    recipe = write_recipe(tmp_path / "r.yaml", {"name": "none", "source": {"type": "jsonl", "path": "data.jsonl"},
                                                "output": {"dir": str(tmp_path / "out")}})
    result = mmdata.build(str(recipe), num_proc=1)
    page = write_report(result.output_dir).read_text(encoding="utf-8")
    assert 'data-count="written">0<' in page and 'data-count="rejected_by_reason:image file not found">1<' in page


# ----------------------------------------------------------------------------------------------- in the browser


@pytest.fixture(scope="session")
def chromium() -> str:
    missing = [p for p, ok in (("chromium", Path(CHROMIUM).exists()), ("fonts-wqy-microhei", _has_cjk_font()))
               if not ok]
    if missing:
        if shutil.which("apt-get") is None:
            pytest.skip(f"{CHROMIUM} missing and no apt-get to install it")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        steps = [["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *missing]]
        for cmd in steps:
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode:
                tail = (done.stderr or done.stdout)[-800:]
                if not Path(CHROMIUM).exists() and any(s in tail for s in NO_NETWORK):
                    pytest.skip(f"{CHROMIUM} missing and apt cannot reach a mirror: {tail}")
                if not Path(CHROMIUM).exists():
                    pytest.fail(f"`{' '.join(cmd)}` failed:\n{tail}")
                break  # chromium is there; only the font failed: Chinese may render as boxes in the screenshot
    return CHROMIUM


def _has_cjk_font() -> bool:
    if shutil.which("fc-list") is None:
        return False
    return bool(subprocess.run(["fc-list", ":lang=zh"], capture_output=True, text=True).stdout.strip())


class Browser:
    """Headless Chromium over the DevTools protocol on a pipe: commands on fd 3, replies and events on fd 4."""

    def __init__(self, binary: str, profile: Path):
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        # bash, not sh: dash cannot redirect from file descriptors above 9, and pytest's pipes are numbered higher.
        self.proc = subprocess.Popen(
            ["/bin/bash", "-c", f'exec "$0" "$@" 3<&{to_chrome_r} 4>&{from_chrome_w}', binary, *CHROMIUM_FLAGS,
             f"--user-data-dir={profile}", "about:blank"],
            pass_fds=(to_chrome_r, from_chrome_w), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self.messages: queue.Queue = queue.Queue()
        self.events: list[dict] = []
        self._next_id = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        buffer = b""
        while chunk := os.read(self._from_chrome, 1 << 16):
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            for message in messages:
                self.messages.put(json.loads(message))
        self.messages.put(None)

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 20) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        try:
            os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        except BrokenPipeError:
            raise RuntimeError(f"chromium exited: {self._stderr_tail()}") from None
        deadline = time.monotonic() + timeout
        while True:
            reply = self.messages.get(timeout=max(0.01, deadline - time.monotonic()))
            if reply is None:
                raise RuntimeError(f"chromium exited: {self._stderr_tail()}")
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def _stderr_tail(self) -> str:
        self.proc.wait(timeout=10)
        return self.proc.stderr.read().decode(errors="replace")[-3000:]

    def wait_for(self, method: str, timeout: float = 20) -> dict:
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == method for e in self.events):
            reply = self.messages.get(timeout=max(0.01, deadline - time.monotonic()))
            if reply is None:
                raise RuntimeError("chromium exited")
            self.events.append(reply)
        return next(e for e in self.events if e.get("method") == method)

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except (RuntimeError, queue.Empty, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_chrome)


@pytest.fixture
def browser(chromium, tmp_path):
    b = Browser(chromium, tmp_path / "profile")
    yield b
    b.close()


def test_report_page_in_headless_chromium(browser, build_dir, report, tmp_path_factory):
    target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    for domain in ("Page", "Runtime", "Log", "Network"):
        browser.send(f"{domain}.enable", session=session)
    browser.send("Emulation.setDeviceMetricsOverride", {"width": 1280, "height": 900, "deviceScaleFactor": 1,
                                                        "mobile": False}, session=session)
    browser.events.clear()
    browser.send("Page.navigate", {"url": report.as_uri()}, session=session)
    browser.wait_for("Page.loadEventFired")

    def evaluate(expression: str):
        result = browser.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                   "awaitPromise": True}, session=session)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    images = evaluate("Promise.all([...document.querySelectorAll('.gallery img')].map(i => i.decode()"
                      ".catch(() => null))).then(() => [...document.querySelectorAll('.gallery img')]"
                      ".map(i => [i.alt, i.complete, i.naturalWidth]))")
    plots = evaluate("[...document.querySelectorAll('.plots img')].map(i => [i.alt, i.naturalWidth])")
    shown = evaluate("Object.fromEntries([...document.querySelectorAll('[data-count]')]"
                     ".map(e => [e.dataset.count, e.textContent.replace(/,/g, '')]))")
    text = evaluate("document.body.innerText")
    title = evaluate("document.title")

    # Full-page screenshot, saved where a person can look at it.
    height = browser.send("Page.getLayoutMetrics", session=session)["cssContentSize"]["height"]
    browser.send("Emulation.setDeviceMetricsOverride", {"width": 1280, "height": min(int(height) + 1, 12000),
                                                        "deviceScaleFactor": 1, "mobile": False}, session=session)
    shot = base64.b64decode(browser.send("Page.captureScreenshot", {"format": "png"}, session=session)["data"])
    artifacts = Path(os.environ.get("MMDATA_ARTIFACTS") or tmp_path_factory.getbasetemp())
    artifacts.mkdir(parents=True, exist_ok=True)
    (artifacts / "report_screenshot.png").write_bytes(shot)
    print(f"screenshot: {artifacts / 'report_screenshot.png'}")
    browser.send("Runtime.evaluate", {"expression": "0"}, session=session)  # flush late events

    events = browser.events
    errors = [e["params"] for e in events if e.get("method") == "Runtime.exceptionThrown"
              or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))
              or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
    failed = [e["params"] for e in events if e.get("method") == "Network.loadingFailed"]
    urls = [e["params"]["request"]["url"] for e in events if e.get("method") == "Network.requestWillBeSent"]
    assert not errors, errors
    assert not failed, failed
    assert urls and all(u.startswith(("file:", "data:")) for u in urls), urls  # nothing from the network

    assert len(images) == 12  # samples=12, every one with an image (rejected rows never reach the gallery)
    assert all(complete and width > 0 for _, complete, width in images), images
    assert len(plots) >= 6 and all(width > 0 for _, width in plots), plots

    counts = manifest_counts(build_dir)
    expected = {"read": counts["read"], "written": counts["written"], "rejected": counts["rejected"],
                **{f"rejected_by_reason:{k}": v for k, v in counts["rejected_by_reason"].items()},
                **{f"by_split:{k}": v for k, v in counts["by_split"].items()},
                **{f"by_source:{k}": v for k, v in counts["by_source"].items()}}
    assert {k: int(v) for k, v in shown.items()} == expected

    assert title.startswith("mmdata report") and "pwned" not in title  # record text is shown, never run
    assert HOSTILE[:40] in text
    assert "这是一个红色的方块" in text and "cutoff_len" in text
    assert shot.startswith(b"\x89PNG") and len(shot) > 20_000


def test_the_report_replaces_only_its_own_files_and_refuses_a_users_report_folder(build_dir, tmp_path):
    """`report/` of a folder built with allow_existing may be the user's: index.html and stats.json were
    overwritten and plots/ deleted. The report now keeps a list of what it wrote and removes only those."""
    from mmdata.report import ReportError

    out = tmp_path / "b"
    shutil.copytree(build_dir, out)
    shutil.rmtree(out / "report", ignore_errors=True)
    write_report(out, samples=2)
    (out / "report" / "plots" / "my_chart.png").write_bytes(b"mine")
    (out / "report" / "notes.md").write_text("mine")
    write_report(out, samples=3)  # its own files replaced, the user's additions kept
    assert (out / "report" / "plots" / "my_chart.png").read_bytes() == b"mine"
    assert (out / "report" / "notes.md").read_text() == "mine" and (out / "report" / "index.html").is_file()
    theirs = tmp_path / "c"
    shutil.copytree(build_dir, theirs)
    shutil.rmtree(theirs / "report", ignore_errors=True)
    (theirs / "report").mkdir()
    (theirs / "report" / "index.html").write_text("<h1>my page</h1>")
    with pytest.raises(ReportError, match="holds files mmdata's report did not write"):
        write_report(theirs)
    assert (theirs / "report" / "index.html").read_text() == "<h1>my page</h1>"


def test_the_report_never_reads_an_image_outside_the_build_or_a_fifo(build_dir, tmp_path):
    """A record pointing at ../private/secret.png put that image into a page meant to be shared; a FIFO named as
    an image blocked the report forever."""
    from mmdata.report.html import thumbnail_data_uri
    from mmdata.report.stats import read_image_facts

    secret = tmp_path / "private" / "secret.png"
    secret.parent.mkdir()
    secret.write_bytes(png_bytes((40, 40)))
    media = tmp_path / "build"
    media.mkdir()
    os.mkfifo(media / "fifo.jpg")
    for rel in ("../private/secret.png", str(secret), "fifo.jpg"):
        assert thumbnail_data_uri(media, rel) is None
        assert "not read" in read_image_facts(media, rel).error
