"""Browser-origin safety: no other web page can drive Easel (ui/security.py around the whole app).

First the guard on a tiny ASGI app (each rule on its own), then the real page mounted the way
`app.py serve` mounts it, attacked the way a foreign site would: DNS rebinding (its own Host)
and cross-origin calls (its own Origin) against the private settings event.
"""
from __future__ import annotations

import json

import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from ui.security import (
    SECURITY_HEADERS,
    GuardPolicy,
    LoginLimiter,
    RequestGuard,
    UnicodeBodyCheck,
    allowed_hosts_for,
    normalize_origin,
    same_origin,
)

OWN = "http://127.0.0.1:7860"
EVIL_HOST = "evil.example:7860"
EVIL_ORIGIN = "http://evil.example:7860"


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def tiny_app(calls: list):
    async def hello(request):
        calls.append((request.method, request.url.path))
        body = await request.body()
        # A permissive inner app: the guard must strip what it says about CORS.
        return PlainTextResponse(f"ok {len(body)}", headers={"Access-Control-Allow-Origin": "*",
                                                             "Access-Control-Allow-Credentials": "true"})

    async def login(request):
        calls.append(("POST", "/login"))
        form = await request.form()
        if form.get("password") == "right":
            return JSONResponse({"success": True})
        return JSONResponse({"detail": "Incorrect credentials."}, status_code=400)

    return Starlette(routes=[Route("/", hello, methods=["GET", "POST"]), Route("/login", login, methods=["POST"])])


def guarded(calls, listen=None, extra_hosts=(), cors=(), max_body=1000, limiter=None) -> TestClient:
    policy = GuardPolicy(allowed_hosts=allowed_hosts_for(listen, extra_hosts, addresses=lambda: {"192.0.2.7"}),
                         cors_origins=frozenset(normalize_origin(o) for o in cors), max_body_bytes=max_body)
    return TestClient(RequestGuard(tiny_app(calls), policy, limiter), base_url=OWN)


# --- Host ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("host", [EVIL_HOST, "evil.example", "127.0.0.1.evil.example:7860", "192.0.2.7:7860",
                                  "localhost.:7860x", "[::2]:7860", ""])
def test_foreign_host_is_refused_before_any_route(host):
    calls = []
    response = guarded(calls).get("/", headers={"Host": host})
    assert response.status_code == 403
    assert response.json()["detail"].startswith("Host:")
    assert calls == []


@pytest.mark.parametrize("host", ["127.0.0.1:7860", "localhost:7860", "LOCALHOST", "[::1]:7860", "localhost.:7860"])
def test_loopback_names_are_served(host):
    calls = []
    assert guarded(calls).get("/", headers={"Host": host}).status_code == 200
    assert calls == [("GET", "/")]


def test_listening_on_all_addresses_serves_the_machines_own_addresses():
    calls = []
    client = guarded(calls, listen="0.0.0.0")
    assert client.get("/", headers={"Host": "192.0.2.7:7860"}).status_code == 200
    assert client.get("/", headers={"Host": "192.0.2.8:7860"}).status_code == 403


def test_listening_on_one_address_serves_that_address_only():
    hosts = allowed_hosts_for("10.1.2.3", addresses=lambda: {"192.0.2.7"})
    assert "10.1.2.3" in hosts and "192.0.2.7" not in hosts and "127.0.0.1" in hosts


def test_allowed_hosts_option_adds_a_name():
    calls = []
    client = guarded(calls, extra_hosts=["easel.home.arpa"])
    assert client.get("/", headers={"Host": "easel.home.arpa:7860"}).status_code == 200
    assert client.get("/", headers={"Host": "other.home.arpa:7860"}).status_code == 403


# --- Origin and CORS -------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["GET", "POST"])
@pytest.mark.parametrize("origin", [EVIL_ORIGIN, "null", "http://localhost:7860", "file://",
                                    "http://127.0.0.1:9999"])  # another local server's page
def test_foreign_origin_is_refused(method, origin):
    calls = []
    response = guarded(calls).request(method, "/", headers={"Origin": origin})
    assert response.status_code == 403
    assert response.json()["detail"].startswith("Origin:")
    assert calls == []


@pytest.mark.parametrize("origin, host, scheme, same", [
    ("http://127.0.0.1:7860", "127.0.0.1:7860", "http", True),
    ("http://127.0.0.1:9999", "127.0.0.1:7860", "http", False),
    # A Host without a port is the scheme's default port (issue 20: it used to match any port).
    ("http://127.0.0.1:9999", "127.0.0.1", "http", False),
    ("http://127.0.0.1", "127.0.0.1", "http", True),
    ("http://127.0.0.1:80", "127.0.0.1", "http", True),
    ("http://127.0.0.1", "127.0.0.1:80", "http", True),
    ("https://127.0.0.1", "127.0.0.1", "http", False),        # port 443: another server
    ("http://127.0.0.1:443", "127.0.0.1", "https", False),
    ("https://easel.example", "easel.example", "https", True),  # behind a TLS proxy that says so
    ("https://easel.example:443", "easel.example", "https", True),
    ("https://easel.example:8443", "easel.example", "https", False),
    ("https://127.0.0.1:7860", "127.0.0.1:7860", "http", False),  # the whole origin: scheme too
    ("http://localhost:7860", "127.0.0.1:7860", "http", False),
    ("http://[::1]:7860", "[::1]:7860", "http", True),
    ("http://[::1]", "[::1]", "ws", True),                     # a WebSocket's page is http(s)
    ("http://LOCALHOST.:7860", "localhost:7860", "http", True),
    ("http://127.0.0.1:7860", "127.0.0.1:7860x", "http", False),
    ("http://127.0.0.1:7860/", "127.0.0.1:7860", "http", False),  # not an origin
    ("null", "127.0.0.1", "http", False),
])
def test_same_origin_compares_scheme_host_and_port(origin, host, scheme, same):
    assert same_origin(origin, host, scheme) is same


@pytest.mark.parametrize("origin, status", [("http://127.0.0.1:9999", 403), ("https://127.0.0.1", 403),
                                            ("http://127.0.0.1", 200), ("http://127.0.0.1:80", 200)])
def test_a_host_without_a_port_is_port_80(origin, status):
    # Easel on port 80, or behind a proxy that drops the port: another local server's page is foreign.
    calls = []
    response = guarded(calls).post("/", headers={"Host": "127.0.0.1", "Origin": origin})
    assert response.status_code == status
    assert calls == ([("POST", "/")] if status == 200 else [])


def test_the_pages_own_origin_is_served_without_cors_headers():
    calls = []
    response = guarded(calls).post("/", headers={"Origin": OWN}, content=b"x")
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers
    assert "access-control-allow-credentials" not in response.headers


def test_an_origin_the_user_allowed_gets_cors_headers():
    calls = []
    response = guarded(calls, cors=["https://plugin.example"]).post("/", headers={"Origin": "https://plugin.example"})
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "*"  # the inner app's answer is passed on


def test_cross_site_embedding_without_origin_is_refused():
    # <img src="http://127.0.0.1:7860/..."> on another site sends no Origin, but says cross-site.
    calls = []
    headers = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"}
    assert guarded(calls).get("/", headers=headers).status_code == 403
    assert calls == []


def test_following_a_link_from_another_site_opens_the_page():
    calls = []
    headers = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}
    assert guarded(calls).get("/", headers=headers).status_code == 200


# --- headers and bodies ----------------------------------------------------------------------------

@pytest.mark.parametrize("path, host, status", [("/", "127.0.0.1:7860", 200), ("/missing", "127.0.0.1:7860", 404),
                                                ("/", EVIL_HOST, 403)])
def test_every_response_carries_the_protective_headers(path, host, status):
    response = guarded([]).get(path, headers={"Host": host})
    assert response.status_code == status
    for name, value in SECURITY_HEADERS:
        assert response.headers[name.decode()] == value.decode()


def test_an_app_that_fails_answers_500_with_the_protective_headers():
    # uvicorn's own 500 (the app raised before answering) carries none: the guard answers instead.
    async def broken(scope, receive, send):
        raise RuntimeError("bug")

    async def silent(scope, receive, send):
        return None

    policy = GuardPolicy(allowed_hosts=allowed_hosts_for(None))
    for app in (broken, silent):
        response = TestClient(RequestGuard(app, policy), base_url=OWN, raise_server_exceptions=False).get("/")
        assert response.status_code == 500 and "internal error" in response.json()["detail"]
        for name, value in SECURITY_HEADERS:
            assert response.headers[name.decode()] == value.decode()
    with pytest.raises(RuntimeError):  # still raised, so the server logs it
        TestClient(RequestGuard(broken, policy), base_url=OWN).get("/")


def test_an_announced_body_over_the_limit_is_refused_unread():
    calls = []
    response = guarded(calls, max_body=1000).post("/", content=b"x" * 1001)
    assert response.status_code == 413
    assert "request body" in response.json()["detail"] and "--max-upload-mb" in response.json()["detail"]
    assert calls == []


def test_a_streamed_body_over_the_limit_is_refused():
    calls = []

    def chunks():
        for _ in range(20):
            yield b"x" * 100

    response = guarded(calls, max_body=1000).post("/", content=chunks())  # chunked: no Content-Length
    assert response.status_code == 413


def test_a_body_within_the_limit_is_passed_on():
    response = guarded([], max_body=1000).post("/", content=b"x" * 1000)
    assert response.status_code == 200 and response.text == "ok 1000"


# --- login rate limit ------------------------------------------------------------------------------

def test_limiter_locks_an_address_after_repeated_failures():
    clock = FakeClock()
    limiter = LoginLimiter(failures_allowed=3, first_wait_s=30, clock=clock)
    for _ in range(2):
        limiter.failed("10.0.0.9")
    assert limiter.wait_left("10.0.0.9") == 0
    limiter.failed("10.0.0.9")
    assert limiter.wait_left("10.0.0.9") == 30
    assert limiter.wait_left("10.0.0.10") == 0  # another address is not affected


def test_limiter_wait_doubles_while_failures_go_on_and_success_clears_it():
    clock = FakeClock()
    limiter = LoginLimiter(failures_allowed=2, first_wait_s=30, longest_wait_s=100, clock=clock)
    limiter.failed("a"), limiter.failed("a")
    clock.now += 31
    limiter.failed("a")
    assert limiter.wait_left("a") == 60
    clock.now += 61
    limiter.failed("a")
    assert limiter.wait_left("a") == 100  # capped
    limiter.succeeded("a")
    assert limiter.wait_left("a") == 0


def test_limiter_forgets_failures_outside_its_window():
    clock = FakeClock()
    limiter = LoginLimiter(failures_allowed=2, window_s=60, clock=clock)
    limiter.failed("a")
    clock.now += 61
    limiter.failed("a")
    assert limiter.wait_left("a") == 0


def test_wrong_passwords_through_the_guard_lead_to_429_with_a_clear_message():
    clock = FakeClock()
    calls = []
    client = guarded(calls, limiter=LoginLimiter(failures_allowed=3, first_wait_s=30, clock=clock))
    for _ in range(3):
        assert client.post("/login", data={"username": "u", "password": "wrong"}).status_code == 400
    refused = client.post("/login", data={"username": "u", "password": "right"})
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "30"
    assert refused.json()["detail"].startswith("login: too many wrong passwords") and "30 s" in refused.json()["detail"]
    assert len(calls) == 3  # the locked attempt never reached the password check
    clock.now += 30
    assert client.post("/login", data={"username": "u", "password": "right"}).status_code == 200


# --- the real page, attacked -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def page_app(tmp_path_factory):
    """The demo engine's page behind the guard, mounted exactly as `app.py serve` does."""
    from engine.engine import Engine, EngineConfig
    from ui.app_ui import create_ui
    from ui.server import build_app
    from ui.settings import SettingsStore

    root = tmp_path_factory.mktemp("origin-page")
    engine = Engine.demo(EngineConfig(root / "models", root / "outputs", root / "data"))
    settings = SettingsStore(root / "data" / "settings.json")
    page = create_ui(engine, settings)
    page.queue(max_size=4)
    limiter = LoginLimiter(failures_allowed=3, clock=FakeClock())
    app = build_app(page, logins=[], outdir=root / "outputs", max_upload_mb=1, limiter=limiter)
    with TestClient(app, base_url=OWN) as client:
        yield client, settings, root


def _settings_event(client) -> int:
    config = client.get("/config").json()
    elem = {c["id"]: c.get("props", {}).get("elem_id") for c in config["components"]}
    return next(d["id"] for d in config["dependencies"] if any(elem.get(t[0]) == "settings-save" for t in d["targets"]))


def _save_settings(client, fn: int, folder: str, headers: dict):
    return client.post("/gradio_api/run/predict", headers=headers,
                       json={"fn_index": fn, "data": [folder, False], "session_hash": "attacker"})


@pytest.mark.parametrize("headers", [
    {"Host": EVIL_HOST, "Origin": EVIL_ORIGIN},   # DNS rebinding: the attacker's name resolved to 127.0.0.1
    {"Origin": EVIL_ORIGIN},                      # a plain cross-origin call to 127.0.0.1
    {"Origin": "null"},                           # from a sandboxed frame
])
def test_a_foreign_page_cannot_change_the_settings(page_app, headers):
    client, settings, root = page_app
    fn = _settings_event(client)
    before = settings.path.read_bytes() if settings.path.exists() else None
    response = _save_settings(client, fn, str(root / "attacker-folder"), headers)
    assert response.status_code == 403
    assert "access-control-allow-origin" not in response.headers
    assert (settings.path.read_bytes() if settings.path.exists() else None) == before
    assert not (root / "attacker-folder").exists()


def test_the_page_itself_can_change_the_settings(page_app):
    # The positive control for the test above: the same call from the page's own origin works.
    client, settings, root = page_app
    fn = _settings_event(client)
    response = _save_settings(client, fn, str(root / "outputs"), {"Origin": OWN})
    assert response.status_code == 200
    assert json.loads(settings.path.read_text())["watermark"] is False


def test_the_page_is_served_with_protective_headers_and_no_cors(page_app):
    client, _, _ = page_app
    response = client.get("/")
    assert response.status_code == 200 and "<html" in response.text.lower()
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "same-origin"
    assert "access-control-allow-origin" not in client.get("/config", headers={"Origin": OWN}).headers


def test_an_upload_over_the_limit_is_refused_with_413(page_app):
    client, _, _ = page_app
    response = client.post("/gradio_api/upload", files={"files": ("big.png", b"\0" * (3 * 1024 * 1024), "image/png")})
    assert response.status_code == 413
    assert "--max-upload-mb" in response.json()["detail"]


def test_gradio_login_is_rate_limited_per_address(tmp_path):
    """Gradio's real /login behind the guard: the right password is refused while locked, and
    works once the wait is over (the clock is the limiter's, so no test waits for real)."""
    from engine.engine import Engine, EngineConfig
    from ui.app_ui import create_ui
    from ui.server import build_app

    engine = Engine.demo(EngineConfig(tmp_path / "models", tmp_path / "outputs", tmp_path / "data"))
    page = create_ui(engine)
    page.queue(max_size=4)
    clock = FakeClock()
    limiter = LoginLimiter(failures_allowed=3, first_wait_s=30, clock=clock)
    app = build_app(page, logins=[("user", "pass")], outdir=tmp_path / "outputs", max_upload_mb=1, limiter=limiter)
    with TestClient(app, base_url=OWN) as client:
        assert client.get("/config").status_code == 401
        for _ in range(3):
            assert client.post("/login", data={"username": "user", "password": "nope"}).status_code == 400
        locked = client.post("/login", data={"username": "user", "password": "pass"})
        assert locked.status_code == 429 and "try again in 30 s" in locked.json()["detail"]
        clock.now += 30
        assert client.post("/login", data={"username": "user", "password": "pass"}).status_code == 200
        assert client.get("/config").status_code == 200


# --- JSON bodies with a lone UTF-16 surrogate (issue 20) -------------------------------------------

def surrogate_checked(calls: list) -> TestClient:
    async def echo(request):
        body = await request.body()
        calls.append(body)
        return PlainTextResponse(f"ok {len(body)}")

    app = Starlette(routes=[Route("/sdapi/v1/txt2img", echo, methods=["POST"]), Route("/page", echo, methods=["POST"])])
    return TestClient(UnicodeBodyCheck(app, path_prefixes=("/sdapi/",)), base_url=OWN)


@pytest.mark.parametrize("body, field", [
    (b'{"prompt": "a\\ud800b"}', "prompt"),
    (b'{"styles": ["ok", "x\\uDC00"]}', "styles.1"),                    # a field only echoed back
    (b'{"override_settings": {"sd_model_checkpoint": "\\udfff"}}', "override_settings.sd_model_checkpoint"),
    (b'{"comments": {"\\ud800": 1}}', "comments"),                      # a field name
    (b'{"prompt": "a\xed\xa0\x80b"}', "prompt"),                       # its bytes, as if UTF-8
])
def test_a_json_body_with_a_lone_surrogate_is_refused_naming_the_field(body, field):
    calls = []
    response = surrogate_checked(calls).post("/sdapi/v1/txt2img", content=body,
                                             headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and calls == []
    detail = response.json()["detail"][0]
    assert detail["loc"] == ["body", *field.split(".")]
    assert detail["msg"].startswith(f"{field}: ") and "unpaired surrogate U+D" in detail["msg"]
    assert detail["msg"].endswith("text must be valid Unicode") and detail["msg"].isascii()


@pytest.mark.parametrize("body", [b'{"prompt": "a cat \\ud83d\\ude00"}',  # a pair: one character
                                  b'{"prompt": "a \\\\ud800 written out"}',    # an escaped backslash
                                  b'{"prompt": "a cat"}', b'not json \\ud800'])
def test_other_bodies_are_passed_on_whole(body):
    calls = []
    response = surrogate_checked(calls).post("/sdapi/v1/txt2img", content=body,
                                             headers={"Content-Type": "application/json"})
    assert response.status_code == 200 and calls == [body]


def test_the_page_and_non_json_bodies_are_not_inspected():
    calls = []
    client = surrogate_checked(calls)
    body = b'{"data": ["a\\ud800b"]}'
    assert client.post("/page", content=body, headers={"Content-Type": "application/json"}).status_code == 200
    assert client.post("/sdapi/v1/txt2img", content=body, headers={"Content-Type": "text/plain"}).status_code == 200
    assert calls == [body, body]
