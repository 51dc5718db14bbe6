"""The outer guard every request passes before any route runs (the page, its files, the API).

Loopback is not a trust boundary: any web page the user opens can send requests to
127.0.0.1, and with DNS rebinding a foreign site can even make them look same-origin to the
browser (its own name, resolved to 127.0.0.1). So, as an ASGI middleware outside Gradio:

- **Host**: a request whose Host is not a name Easel serves on (loopback names; with
  `--listen`, this machine's own addresses; hosts the user lists with `--allowed-hosts`) gets
  403. That defeats DNS rebinding: the attacker's page carries the attacker's host name.
- **Origin**: a request sent by a page of another origin gets 403 (any method, WebSockets too),
  unless `--cors-allow-origins` lists that origin. Origins are compared whole: scheme, host and
  port, a Host header without a port meaning the scheme's default (http 80, https 443). "null" (sandboxed frames, file://) is foreign.
  Where the browser says the request is cross-site (`Sec-Fetch-Site`) and it is not the user
  following a link, it is refused too: no other site can embed Easel's files or results.
- **CORS**: only origins the user listed ever get `Access-Control-Allow-*` headers.
- **Headers**: frame protection, `nosniff`, `Referrer-Policy: same-origin` and
  `Cross-Origin-Resource-Policy: same-origin` on every response (a 500 of a failing app is
  answered here, to carry them; ui/server.py gives uvicorn's own 400s the same headers).
- **Text**: `UnicodeBodyCheck` answers 422 to an API JSON body holding a lone UTF-16 surrogate.
- **Bodies**: a request body over the limit gets 413 before anything reads it whole
  (Content-Length up front; a chunked body is counted as it streams).
- **Logins**: failed logins are counted per client address; after `LOGIN_FAILURES_ALLOWED`
  within `LOGIN_WINDOW_S`, that address waits (the wait doubles, capped) and gets 429 with a
  message saying how long.

Plain data in, plain ASGI out: no Gradio import, so it can be tested on its own.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import math
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable
from urllib.parse import urlsplit

logger = logging.getLogger(__name__)

LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
SECURITY_HEADERS = (
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy", b"frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
)
CORS_HEADERS = frozenset({
    b"access-control-allow-origin", b"access-control-allow-credentials", b"access-control-allow-methods",
    b"access-control-allow-headers", b"access-control-expose-headers", b"access-control-max-age",
})
BODY_OVERHEAD = 1024 * 1024  # room for multipart framing and form fields around the largest upload

LOGIN_FAILURES_ALLOWED = 5      # wrong passwords from one address before it has to wait
LOGIN_WINDOW_S = 300.0          # failures older than this are forgotten
LOGIN_FIRST_WAIT_S = 30.0       # the first wait; each further failure while locked doubles it
LOGIN_LONGEST_WAIT_S = 900.0


def host_name(value: str) -> str:
    """The host part of a Host header or an origin's netloc, lower-case, without port or brackets;
    "" when the value is malformed (a port that is not a number, an unclosed bracket)."""
    value = value.strip().lower()
    port = ""
    if value.startswith("["):  # [::1]:7860
        end = value.find("]")
        if end < 0:
            return ""
        value, port = value[1:end], value[end + 1:]
        if port and not port.startswith(":"):
            return ""
        port = port[1:]
    elif value.count(":") == 1:  # name:port (a bare IPv6 address has several colons)
        value, port = value.split(":", 1)
    if port and not port.isdigit():
        return ""
    return value.rstrip(".")


def normalize_host(value: str) -> str:
    """A host name or address as compared by the guard: IP addresses in their canonical form."""
    name = host_name(value)
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        return name


def machine_addresses() -> set[str]:
    """Every address of this machine's interfaces, and its host names: the names a LAN client may
    use to reach a server listening on all addresses. Read from the OS; sends no traffic."""
    name = socket.gethostname().lower()
    found: set[str] = {name, f"{name}.local", socket.getfqdn().lower()}  # .local: mDNS names on a LAN
    try:
        import psutil

        for addresses in psutil.net_if_addrs().values():
            for address in addresses:
                if address.family in (socket.AF_INET, socket.AF_INET6):
                    found.add(address.address.split("%", 1)[0])  # fe80::1%eth0 -> fe80::1
    except Exception:  # noqa: BLE001 - psutil missing or an odd platform: the host names still count
        pass
    return {normalize_host(a) for a in found if a}


def allowed_hosts_for(listen: str | None, extra: Iterable[str] = (),
                      addresses: Callable[[], set[str]] = machine_addresses) -> frozenset[str]:
    """The Host names the guard accepts: loopback always; with --listen, the address listened on
    (all of this machine's addresses for 0.0.0.0 / ::); plus the user's --allowed-hosts."""
    hosts = set(LOOPBACK_HOSTS)
    if listen:
        wildcard = listen in ("0.0.0.0", "::")
        hosts |= addresses() if wildcard else {normalize_host(listen)}
    hosts |= {normalize_host(h) for h in extra if h.strip()}
    return frozenset(hosts)


DEFAULT_PORTS = {"http": 80, "https": 443}
WEBSOCKET_SCHEMES = {"ws": "http", "wss": "https"}  # a WebSocket's page has the http(s) origin


def origin_parts(origin: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an http(s) origin, the host as `normalize_host` writes it and the
    scheme's default port made explicit (http 80, https 443); None when it is not one."""
    parts = urlsplit(origin.strip().lower())
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname or parts.path or parts.query or parts.fragment:
        return None
    try:
        port = parts.port
    except ValueError:
        return None
    host = normalize_host(f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname)
    return (parts.scheme, host, port or DEFAULT_PORTS[parts.scheme]) if host else None


def reachable_as(host: str, scheme: str) -> tuple[str, str, int] | None:
    """The origin a request was sent to, as `origin_parts`: its scheme (the connection's, or the
    X-Forwarded-Proto of a trusted proxy, as the server reports it), and its Host header's name
    and port; a Host without a port means the scheme's default port, as it does to the browser."""
    scheme = WEBSOCKET_SCHEMES.get(scheme, scheme)
    if scheme not in DEFAULT_PORTS or not host.strip() or any(c in host for c in "/?#@\\"):
        return None
    return origin_parts(f"{scheme}://{host.strip()}")


def same_origin(origin: str, host: str, scheme: str) -> bool:
    """Whether a request's Origin is the origin the request was sent to (`reachable_as`): the
    same scheme, host and port. A page on another port of the same machine (another local
    server) is another site, also when the Host header carries no port."""
    own = reachable_as(host, scheme)
    return own is not None and origin_parts(origin) == own


def normalize_origin(origin: str) -> str | None:
    """scheme://host[:port] in lower case, or None when it is not an http(s) origin."""
    parts = urlsplit(origin.strip().lower())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    host = parts.hostname
    host = f"[{host}]" if ":" in host else host
    default = {"http": 80, "https": 443}[parts.scheme]
    try:
        port = parts.port
    except ValueError:
        return None
    return f"{parts.scheme}://{host}" + (f":{port}" if port and port != default else "")


@dataclass
class LoginLimiter:
    """Failed logins per client address, and when each address may try again."""
    failures_allowed: int = LOGIN_FAILURES_ALLOWED
    window_s: float = LOGIN_WINDOW_S
    first_wait_s: float = LOGIN_FIRST_WAIT_S
    longest_wait_s: float = LOGIN_LONGEST_WAIT_S
    clock: Callable[[], float] = time.monotonic
    _failures: dict[str, list[float]] = field(default_factory=dict)
    _locked_until: dict[str, tuple[float, float]] = field(default_factory=dict)  # address: (until, wait)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def wait_left(self, address: str) -> float:
        """Seconds this address must still wait before it may try a password (0: may try now)."""
        with self._lock:
            until, _ = self._locked_until.get(address, (0.0, 0.0))
            return max(0.0, until - self.clock())

    def failed(self, address: str) -> None:
        with self._lock:
            now = self.clock()
            recent = [t for t in self._failures.get(address, []) if now - t < self.window_s] + [now]
            self._failures[address] = recent
            if len(recent) >= self.failures_allowed:
                _, last_wait = self._locked_until.get(address, (0.0, 0.0))
                wait = min(self.longest_wait_s, last_wait * 2 if last_wait else self.first_wait_s)
                self._locked_until[address] = (now + wait, wait)
            if len(self._failures) > 10_000:  # bounded memory even under a flood of addresses
                self._forget_old(now)

    def succeeded(self, address: str) -> None:
        with self._lock:
            self._failures.pop(address, None)
            self._locked_until.pop(address, None)

    def _forget_old(self, now: float) -> None:
        for address in [a for a, ts in self._failures.items() if now - ts[-1] >= self.window_s]:
            self._failures.pop(address, None)
            if self._locked_until.get(address, (0.0,))[0] <= now:
                self._locked_until.pop(address, None)


@dataclass(frozen=True)
class GuardPolicy:
    allowed_hosts: frozenset[str]
    cors_origins: frozenset[str] = frozenset()   # normalized origins the user allowed (--cors-allow-origins)
    max_body_bytes: int = 50 * 1024 * 1024 + BODY_OVERHEAD
    login_paths: frozenset[str] = frozenset({"/login", "/login/"})


class RequestGuard:
    """ASGI middleware enforcing `GuardPolicy` around `app` (see the module docstring)."""

    def __init__(self, app, policy: GuardPolicy, limiter: LoginLimiter | None = None):
        self.app = app
        self.policy = policy
        self.limiter = limiter or LoginLimiter()

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            await _refuse(scope, receive, send, *refusal)
            return
        origin = headers.get("origin")
        allowed_cors = origin is not None and normalize_origin(origin) in self.policy.cors_origins
        state = {"started": False, "refused": False}
        send = self._with_headers(send, allowed_cors, state)
        if scope["type"] == "http":
            receive = self._bounded(scope, receive, send, state)
        try:
            if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in self.policy.login_paths:
                await self._login(scope, receive, send)
            else:
                await self.app(scope, receive, send)
        except Exception:
            if state["refused"]:
                return  # the app saw the client "go away" after an oversized body and gave up: already answered
            if scope["type"] == "http" and not state["started"]:
                # Answer the 500 here, with the protective headers: the server's own has none.
                await _refuse(scope, receive, send, 500, "internal error; see the server's log")
            raise
        if scope["type"] == "http" and not state["started"] and not state["refused"]:
            logger.error("%s %s: the app returned without answering", scope.get("method"), scope.get("path"))
            await _refuse(scope, receive, send, 500, "internal error: no answer; see the server's log")

    # --- decisions ------------------------------------------------------------------------------
    def _refusal(self, scope, headers: dict[str, str]) -> tuple[int, str] | None:
        host = headers.get("host")
        if not host or normalize_host(host) not in self.policy.allowed_hosts:
            return 403, ("Host: this server does not answer to that name; add it with --allowed-hosts "
                         "if you reach Easel through it")
        origin = headers.get("origin")
        if origin is not None and not self._same_site(origin, host, scope.get("scheme", "http")):
            return 403, ("Origin: requests from other web sites are refused; list a site with "
                         "--cors-allow-origins to allow it")
        fetch_site = headers.get("sec-fetch-site")
        if (fetch_site == "cross-site" and headers.get("sec-fetch-mode") != "navigate"
                and (origin is None or normalize_origin(origin) not in self.policy.cors_origins)):
            return 403, "Sec-Fetch-Site: other web sites may not embed or call Easel"
        if scope["type"] == "http":
            length = headers.get("content-length")
            if length is not None:
                if not length.isdigit():
                    return 400, "Content-Length: must be a whole number of bytes"
                if int(length) > self.policy.max_body_bytes:
                    return 413, self._too_large()
        return None

    def _same_site(self, origin: str, host: str, scheme: str) -> bool:
        normalized = normalize_origin(origin)
        if normalized is None:  # "null", file://, garbage
            return False
        if normalized in self.policy.cors_origins:
            return True
        # The page's own origin: scheme, host name and port all equal to what this request was
        # sent to (a page of another local server, on another port, is another site).
        return same_origin(origin, host, scheme)

    def _too_large(self) -> str:
        mb = math.floor(self.policy.max_body_bytes / (1024 * 1024))
        return f"request body: larger than the limit of {mb} MB (set with --max-upload-mb)"

    # --- response and body wrappers -------------------------------------------------------------
    def _with_headers(self, send, allowed_cors: bool, state: dict):
        async def wrapped(message):
            if state["refused"]:  # we already answered 413; what the app says after is dropped
                return
            if message["type"] in ("http.response.start", "websocket.http.response.start"):
                state["started"] = True
                kept = [(k, v) for k, v in message.get("headers", [])
                        if allowed_cors or k.lower() not in CORS_HEADERS]
                present = {k.lower() for k, _ in kept}
                kept += [(k, v) for k, v in SECURITY_HEADERS if k not in present]
                message = {**message, "headers": kept}
            await send(message)
        return wrapped

    def _bounded(self, scope, receive, send, state: dict):
        """receive() that counts body bytes; past the limit the app sees the client go away and
        the client gets 413 (for bodies whose size was not announced up front)."""
        limit = self.policy.max_body_bytes
        seen = 0

        async def wrapped():
            nonlocal seen
            if state["refused"]:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    if not state["started"]:
                        await _refuse(scope, receive, send, 413, self._too_large())
                    state["refused"] = True
                    return {"type": "http.disconnect"}
            return message
        return wrapped

    async def _login(self, scope, receive, send) -> None:
        address = (scope.get("client") or ("unknown", 0))[0]
        wait = self.limiter.wait_left(address)
        if wait > 0:
            await _refuse(scope, receive, send, 429,
                          f"login: too many wrong passwords from {address}; try again in {math.ceil(wait)} s",
                          extra_headers=[(b"retry-after", str(math.ceil(wait)).encode())])
            return
        status: dict[str, int] = {}

        async def watching(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        await self.app(scope, receive, watching)
        code = status.get("code", 500)
        if code < 400:
            self.limiter.succeeded(address)
        elif code in (400, 401, 403):  # Gradio answers a wrong password with 400 "Incorrect credentials"
            self.limiter.failed(address)


# What a lone UTF-16 surrogate looks like in a JSON body: the escape "\\ud800".."\\udfff" (a pair
# of escapes is one character and passes), or its bytes written as if UTF-8 (json.loads takes
# those with "surrogatepass"). Only a body that holds one is parsed here.
_SURROGATE_IN_JSON = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}|\xed[\xa0-\xbf]")
JSON_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def surrogate_field(body: bytes) -> tuple[str, str] | None:
    """(field, reason) for the first text in a JSON document that holds a lone UTF-16 surrogate:
    the field as dotted names ("styles.0", "override_settings.sd_model_checkpoint"; "" for the
    document itself or a field name at its top); None when
    there is none, or when the body is not JSON (the route answers that itself)."""
    if not _SURROGATE_IN_JSON.search(body):
        return None
    try:
        document = json.loads(body)
    except ValueError:
        return None
    from engine.request import unpaired_surrogate

    pending: list[tuple[str, object]] = [("", document)]
    while pending:
        path, value = pending.pop()
        if isinstance(value, str):
            reason = unpaired_surrogate(value)
            if reason:
                return path, reason
        elif isinstance(value, dict):
            for key in value:
                reason = unpaired_surrogate(key)
                if reason:
                    return path, f"a field name {reason}"
            pending += reversed([(f"{path}.{k}" if path else k, v) for k, v in value.items()])
        elif isinstance(value, list):
            pending += reversed([(f"{path}.{i}" if path else str(i), v) for i, v in enumerate(value)])
    return None


class UnicodeBodyCheck:
    """ASGI middleware: a JSON request body with a lone UTF-16 surrogate in any text (a prompt, a
    style, an ignored field, a field name) gets HTTP 422 naming the field, in FastAPI's shape,
    before any route reads it. Such text is not valid Unicode: it cannot be tokenized, written
    into a PNG or sent back in a JSON answer (the API echoes a body's fields), so past this point
    it could only crash (HTTP 500). Bodies are bounded by the RequestGuard outside this one."""

    def __init__(self, app, path_prefixes: tuple[str, ...] = ("/",)):
        self.app = app
        self.path_prefixes = path_prefixes

    async def __call__(self, scope, receive, send):
        if (scope["type"] != "http" or scope["method"] not in JSON_METHODS
                or not scope["path"].startswith(self.path_prefixes) or not _json_body(_headers(scope))):
            await self.app(scope, receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away (or the guard answered 413): nothing to answer
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        found = surrogate_field(body)
        if found is not None:
            field_name, reason = found
            detail = {"type": "value_error", "loc": ["body", *field_name.split(".")] if field_name else ["body"],
                      "msg": f"{field_name or 'body'}: {reason}", "input": None}
            payload = json.dumps({"detail": [detail]}, ensure_ascii=True).encode()  # no surrogate in the answer
            await send({"type": "http.response.start", "status": 422,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(payload)).encode())]})
            await send({"type": "http.response.body", "body": payload})
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _json_body(headers: dict[str, str]) -> bool:
    """Whether a route may read the body as JSON: FastAPI does when it says JSON, or says nothing."""
    kind = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    return kind == "" or kind == "application/json" or kind.endswith("+json")


def _headers(scope) -> dict[str, str]:
    result: dict[str, str] = {}
    for key, value in scope.get("headers", []):
        name = key.decode("latin-1").lower()
        if name not in result:  # the first of repeated headers counts, as most servers do
            result[name] = value.decode("latin-1")
    return result


async def _refuse(scope, receive, send, status: int, message: str, extra_headers=()) -> None:
    body = json.dumps({"detail": message, "error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *SECURITY_HEADERS, *extra_headers]
    if scope["type"] == "websocket":
        # Reject the handshake with an HTTP response where the server supports it, else close.
        if "websocket.http.response" in scope.get("extensions", {}):
            await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
            await send({"type": "websocket.http.response.body", "body": body})
        else:
            await send({"type": "websocket.close", "code": 1008})
        return
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
