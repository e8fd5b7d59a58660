"""flux2 serve's web page in a real headless Chromium (the system's, driven by Playwright): type a prompt,
press Generate, watch the progress bar move and the picture arrive in the gallery."""

import shutil

import pytest

pytest.importorskip("starlette", reason="flux2 serve needs the serve extra")
sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright (test extra)")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("no system Chromium to drive (Debian: apt-get install chromium; .ci/run installs it)",
                allow_module_level=True)

from test_serve import start_server  # noqa: E402

from flux2_mlx.config import MODELS  # noqa: E402
from flux2_mlx.pipeline import load_pipeline  # noqa: E402
from flux2_mlx.server import ImageServer  # noqa: E402

# Every value the <progress> bar takes, recorded as the page sets it.
WATCH_PROGRESS = """() => {
  window.seen = [];
  const bar = document.getElementById("progress");
  new MutationObserver(() => window.seen.push(bar.value)).observe(bar, {attributes: true});
}"""


def test_page_generates_with_progress_into_the_gallery(short_prompts, tiny_repo, tmp_path):
    spec = MODELS["klein-4b"]
    srv = ImageServer(lambda name: load_pipeline(name, model_path=tiny_repo), [spec])
    srv.start()
    srv.wait_ready()
    url, stop = start_server(srv)
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM)
            page = browser.new_page(viewport={"width": 1100, "height": 700})
            page.goto(url)
            page.wait_for_selector("#model:has-text('klein-4b')")
            assert page.get_attribute("#steps", "placeholder") == str(spec.default_steps)
            assert page.is_hidden("#negative-row")  # klein-4b takes no negative prompt
            page.fill("#prompt", "a red fox in snow")
            page.fill("#width", "32")
            page.fill("#height", "32")
            page.fill("#steps", "12")
            page.evaluate(WATCH_PROGRESS)
            page.click("#generate")
            page.wait_for_function("() => { const im = document.querySelector('#gallery .card img');"
                                   " return im && im.complete && im.naturalWidth === 32; }")
            page.wait_for_function("() => !document.getElementById('generate').disabled")
            seen = page.evaluate("window.seen")
            assert len(set(seen)) >= 3 and seen == sorted(seen) and seen[-1] == 12, seen
            assert "seed" in page.inner_text("#gallery .settings")
            assert page.get_attribute("#preview", "src").startswith("data:image/jpeg;base64,")
            assert page.get_attribute("#gallery a", "download").endswith(".png")
            page.click("#gallery .actions button")  # use as reference
            page.wait_for_selector("#refs img")
            page.screenshot(path=tmp_path / "serve-page.png", full_page=True)
            assert page.inner_text("#error") == ""
            browser.close()
    finally:
        stop()
    print(f"screenshot: {tmp_path / 'serve-page.png'}")
