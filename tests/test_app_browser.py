"""The web demo in a real browser: ``app.py --tiny`` served on a free port, driven by Playwright in headless
Chromium (Debian's ``chromium`` package, which ``.ci/run`` installs; no browser download).

One session, as a person uses the page: upload a portrait and a 9-frame driving clip with audio, see the preview
of the aligned faces, generate, fetch the video the page plays and check its frame count, fps and audio; then a
face-less clip gives a readable error, and a next run still works. About 40 s on 2 CPU cores, most of it the
server's start (imports) and the first run's warm-up.

``FLASHPORTRAIT_UPDATE_SCREENSHOT=1`` also writes the page after the first run to ``docs/app_screenshot.png``
(the README's picture; committed once, not rewritten by ordinary test runs).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from flashportrait.video_io import probe_video
from tests.test_app_logic import FPS, TINY_FLAGS, make_media

REPO_ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = REPO_ROOT / "docs" / "app_screenshot.png"
#: Chromium as the probe of these machines starts it: no sandbox (root), no GPU, no calls home
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-quic", "--no-first-run"]
START_TIMEOUT_S = 300
RUN_TIMEOUT_MS = 180_000


#: Debian's chromium (``chromium-browser`` elsewhere); without one the module is skipped before app.py starts
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (.ci/run installs Debian's "
                                "chromium package; locally: apt-get install chromium)")
sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright package (requirements.txt)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``app.py --tiny`` on a free port; yields (url, folder with outputs/ and gradio/ uploads, log file)."""
    root = tmp_path_factory.mktemp("app-server")
    port = free_port()
    log = root / "server.log"
    env = {**os.environ, "GRADIO_TEMP_DIR": str(root / "gradio"), "GRADIO_ANALYTICS_ENABLED": "False"}
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "app.py", *TINY_FLAGS, "--port", str(port), "--save_path", str(root / "outputs")],
            cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, env=env,
        )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if process.poll() is not None:
            pytest.fail(f"app.py exited with {process.returncode} before serving:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"app.py did not serve {url} within {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    yield url, root, log
    process.terminate()  # SIGTERM: app.py stops cleanly (exit 143)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def test_page_generates_a_video_with_audio_shows_errors_and_keeps_working(server, tmp_path):
    url, root, log = server
    media = make_media(tmp_path / "media")

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(RUN_TIMEOUT_MS)
            page.goto(url)
            status = page.locator("#status")

            def upload(image: Path, video: Path) -> None:
                page.locator("#reference input[type=file]").set_input_files(str(image))
                page.locator("#driving input[type=file]").set_input_files(str(video))

            def generate() -> None:
                page.click("#generate")
                page.wait_for_selector("#generate:disabled")  # the run was taken ...
                page.wait_for_selector("#generate:enabled")  # ... and is over

            # 1. upload -> preview of the aligned faces and of the output
            upload(media["reference"], media["talk"])
            page.wait_for_selector("#preview-strip img")
            sync_api.expect(page.locator("#preview-info")).to_contain_text("8 frames at 25 fps")
            sync_api.expect(page.locator("#preview-info")).to_contain_text("32x32 pixels")

            # 2. generate -> the page plays the result: 8 frames at 25 fps with the driving audio
            generate()
            sync_api.expect(status).to_contain_text("Done: 8 frames at 25 fps")
            source = page.locator("#result video").get_attribute("src")
            played = tmp_path / "played.mp4"
            played.write_bytes(page.request.get(source).body())
            info = probe_video(played)
            assert (info.num_frames, info.fps, info.has_audio) == (8, FPS, True), info
            saved = sorted((root / "outputs").iterdir())
            assert [p.suffix for p in saved] == [".json", ".mp4"]
            # the page serves a copy; outputs/ itself is not served (results are not fetchable by name)
            assert page.request.get(f"{url}gradio_api/file={saved[1]}").status in (403, 404)
            sync_api.expect(page.locator("#downloads")).to_contain_text(".json")
            # the uploads were deleted from the server (and cleared from the page)
            assert not [p for p in (root / "gradio").rglob("*") if p.name in ("portrait.png", "talk.mp4")]
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
            if os.environ.get("FLASHPORTRAIT_UPDATE_SCREENSHOT"):
                SCREENSHOT.parent.mkdir(exist_ok=True)
                shutil.copy(tmp_path / "page.png", SCREENSHOT)

            # 3. a video without a face: a readable message, no stack trace
            upload(media["reference"], media["noface"])
            sync_api.expect(status).to_contain_text("no face found")  # already in the preview
            generate()
            sync_api.expect(status).to_contain_text("Error: the driving video (noface.mp4): no face found in any of its 9 frames")
            assert "Traceback" not in page.locator("body").inner_text()

            # 4. the page still works: a next run
            upload(media["reference"], media["talk"])
            generate()
            sync_api.expect(status).to_contain_text("Done: 8 frames at 25 fps")
            assert len(list((root / "outputs").glob("*.mp4"))) == 2
        finally:
            browser.close()
    assert "Traceback" not in log.read_text()  # no unexpected error on the server either
