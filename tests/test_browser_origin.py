"""The guard against other web sites, in a real Chromium (what a user's browser would do).

An attacker's page is served by a second local server on another port (a different origin, as any
web site is); DNS rebinding is played by Chromium's own resolver rules, which point the name
`evil.example` at 127.0.0.1 exactly as a rebinding DNS server would.
"""
from __future__ import annotations

import http.server
import threading
from functools import partial

import pytest

from tests.browser_helpers import LOOPBACK, chromium, free_port, start_server

pytestmark = pytest.mark.browser

ATTACK_PAGE = """<!doctype html><html><body>
<form id="f" method="POST" action="{easel}/gradio_api/run/predict" enctype="text/plain">
<input name='{{"fn_index": 0, "data": [], "x": "' value='"}}'></form>
<script>document.getElementById("f").submit();</script>
</body></html>"""
FRAME_PAGE = """<!doctype html><html><body><iframe id="frame" src="{easel}/"></iframe></body></html>"""


@pytest.fixture(scope="module")
def browser():
    yield from chromium("--host-resolver-rules=MAP evil.example 127.0.0.1")


@pytest.fixture(scope="module")
def easel(browser, tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("origin-browser"), "--demo")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def attacker(easel, tmp_path_factory):
    """Another site: a plain HTTP server on another port serving the attack page."""
    root = tmp_path_factory.mktemp("attacker-site")
    (root / "attack.html").write_text(ATTACK_PAGE.format(easel=easel.url))
    (root / "frame.html").write_text(FRAME_PAGE.format(easel=easel.url))
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer((LOOPBACK, free_port()), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://{LOOPBACK}:{httpd.server_address[1]}"
    httpd.shutdown()


def test_a_rebound_name_gets_403_not_the_page(browser, easel):
    page = browser.new_page()
    port = easel.url.rsplit(":", 1)[1]
    response = page.goto(f"http://evil.example:{port}/")
    assert response.status == 403
    assert "Host:" in page.content() and "txt2img-prompt" not in page.content()
    page.close()


def test_the_same_server_by_its_own_name_serves_the_page(browser, easel):
    page = browser.new_page()
    response = page.goto(easel.url)
    assert response.status == 200
    page.wait_for_selector("#txt2img-prompt textarea", timeout=90_000)
    page.close()


def test_another_sites_form_post_is_refused(browser, easel, attacker):
    page = browser.new_page()
    with page.expect_response(lambda r: r.url.startswith(easel.url + "/gradio_api/run/predict")) as posted:
        page.goto(attacker + "/attack.html")
    response = posted.value
    assert response.status == 403  # Chromium sent its Origin: the attacker's site
    assert "Origin:" in response.text()
    page.close()


def test_another_site_cannot_frame_the_page(browser, easel, attacker):
    page = browser.new_page()
    with page.expect_response(lambda r: r.url.rstrip("/") == easel.url) as framed:
        page.goto(attacker + "/frame.html", wait_until="load")
    # The response reached the browser, which refused to show it in the frame (X-Frame-Options / CSP).
    assert framed.value.headers["x-frame-options"] == "DENY"
    frame = next(f for f in page.frames if f != page.main_frame)
    assert frame.url.startswith("chrome-error://") or "txt2img-prompt" not in frame.content()
    page.close()
