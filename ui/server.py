"""`python app.py serve`: its flags, and the server: our own ASGI app with the page mounted in it.

Safe by default: loopback only; `--listen` (the page on the network) needs a login unless
`--insecure-no-auth` says otherwise; no share tunnel, no analytics; uploads are size-capped and
the server hands out no file outside its output folder and Gradio's own temp folders.

Every request first passes `ui.security.RequestGuard` (Host, Origin, body size, login rate limit,
protective headers), which wraps the whole app, so whatever is mounted later (the HTTP API) is
covered too. We run uvicorn ourselves instead of `Blocks.launch()` because launch() builds its
own app with no place to put a guard outside Gradio's routes and Gradio's CORS handling (which
trusts any origin once the Host header is not a loopback name: DNS rebinding).
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
import webbrowser
from pathlib import Path

import ui  # noqa: F401 - switches Gradio analytics off before gradio is imported

EXIT_BAD_INPUT = 2
EXIT_FAILURE = 1
ANY_ADDRESS = "0.0.0.0"


def add_serve_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--listen", nargs="?", const=ANY_ADDRESS, default=None, metavar="ADDRESS",
                   help="serve on the network (all addresses, or the one given); needs --auth or --auth-file")
    p.add_argument("--port", type=int, default=7860, help="port to serve on (default 7860)")
    p.add_argument("--auth", default=None, metavar="USER:PASSWORD",
                   help="require a login; several as user1:pass1,user2:pass2")
    p.add_argument("--auth-file", type=Path, default=None, metavar="FILE", help="logins, one user:password a line")
    p.add_argument("--insecure-no-auth", action="store_true", help="allow --listen without a login (anyone on the network can use it)")
    p.add_argument("--demo", action="store_true", help="use a tiny random-weight model (makes noise): try the UI with no checkpoint")
    p.add_argument("--no-browser", action="store_true", help="do not open a browser tab")
    p.add_argument("--queue-size", type=int, default=16, help="jobs that may wait for their turn (default 16)")
    p.add_argument("--max-upload-mb", type=int, default=50, help="largest upload accepted, in MB (default 50)")
    p.add_argument("--allowed-hosts", default="", metavar="HOST[,HOST...]",
                   help="other host names the server may be reached by (e.g. a name on your network or a "
                        "reverse proxy's); loopback, and with --listen this machine's addresses, always work")
    # A1111's API flags: the API (/sdapi/v1, ui/api.py) is always on, so --api only keeps their
    # command lines working; --api-auth adds logins for the API alone (HTTP Basic).
    p.add_argument("--api", action="store_true", help="accepted for A1111 compatibility: the HTTP API is always on")
    p.add_argument("--api-auth", default=None, metavar="USER:PASSWORD",
                   help="logins for the HTTP API only (besides --auth's), several as user1:pass1,user2:pass2")
    p.add_argument("--cors-allow-origins", default="", metavar="ORIGIN[,ORIGIN...]",
                   help="web sites (e.g. https://example.com) allowed to call Easel from the browser; none by default")
    # Remember the parser's --outdir default, to tell an --outdir typed on the command line
    # (wins over the one saved in the Settings tab) from the default (does not).
    p.set_defaults(serve_outdir_default=p.get_default("outdir"))


class ServeError(Exception):
    """A bad serve option: one line, exit 2."""


def parse_logins(auth: str | None, auth_file: Path | None) -> list[tuple[str, str]]:
    entries: list[tuple[str, str]] = []
    if auth:
        entries += [(e, "--auth") for e in auth.split(",") if e.strip()]
    if auth_file:
        try:
            lines = auth_file.read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise ServeError(f"--auth-file: cannot read {auth_file}: {e.strerror or e}") from None
        entries += [(line.strip(), f"--auth-file line {i}") for i, line in enumerate(lines, 1)
                    if line.strip() and not line.lstrip().startswith("#")]
    logins = []
    for entry, where in entries:
        user, sep, password = entry.strip().partition(":")
        if not sep or not user or not password:
            raise ServeError(f"{where}: expected user:password")
        logins.append((user, password))
    if (auth or auth_file) and not logins:
        raise ServeError("--auth-file: no user:password lines found" if auth_file else "--auth: expected user:password")
    return logins


def lan_addresses() -> list[str]:
    """This machine's non-loopback IPv4 addresses, found without sending any traffic."""
    found: set[str] = set()
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET):
            found.add(info[4][0])
    except OSError:
        pass
    try:
        # connect() on a UDP socket sends nothing: it only asks the OS which local address would
        # be used to reach a private-network address.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            found.add(s.getsockname()[0])
    except OSError:
        pass
    return sorted(a for a in found if not a.startswith("127.") and a != ANY_ADDRESS)


def _comma_list(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def parse_cors_origins(value: str | None) -> frozenset[str]:
    from ui.security import normalize_origin

    origins = set()
    for origin in _comma_list(value):
        normalized = normalize_origin(origin)
        if normalized is None:
            raise ServeError(f"--cors-allow-origins: {origin!r} is not an http(s) origin like https://example.com")
        origins.add(normalized)
    return frozenset(origins)


def has_display() -> bool:
    if sys.platform in ("win32", "darwin"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def _command_line_outputs(args) -> frozenset[str]:
    """Output options typed on the command line this time; they win over the saved settings."""
    given = set()
    default = getattr(args, "serve_outdir_default", None)
    if default is not None and Path(args.outdir) != Path(default):
        given.add("outdir")
    if getattr(args, "no_watermark", False):
        given.add("watermark")
    return frozenset(given)


def parse_api_logins(api_auth: str | None) -> list[tuple[str, str]]:
    try:
        return parse_logins(api_auth, None)
    except ServeError:
        raise ServeError("--api-auth: expected user:password") from None


def check_serve_options(args) -> tuple[list[tuple[str, str]], frozenset[str]]:
    """(logins, allowed CORS origins) from the serve options; ServeError (one line) when one is bad."""
    logins = parse_logins(args.auth, args.auth_file)
    parse_api_logins(getattr(args, "api_auth", None))
    if args.listen and not logins and not args.insecure_no_auth:
        raise ServeError("--listen shares the page on the network: add --auth user:password or --auth-file FILE "
                         "(or --insecure-no-auth to let anyone on the network use it)")
    if not 1 <= args.port <= 65535:
        raise ServeError(f"--port: must be between 1 and 65535, got {args.port}")
    if args.queue_size < 1:
        raise ServeError(f"--queue-size: must be at least 1, got {args.queue_size}")
    if args.max_upload_mb < 1:
        raise ServeError(f"--max-upload-mb: must be at least 1, got {args.max_upload_mb}")
    return logins, parse_cors_origins(args.cors_allow_origins)


def serve(engine, args) -> int:
    try:
        logins, cors_origins = check_serve_options(args)
    except ServeError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT

    if args.demo:
        from engine.engine import Engine

        engine = Engine.demo(engine.config)

    from ui.app_ui import create_ui

    host = args.listen or "127.0.0.1"
    page = create_ui(engine, listen=bool(args.listen), keep_command_line=_command_line_outputs(args))
    page.queue(max_size=args.queue_size)
    outdir = Path(engine.outputs.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    app = build_app(page, logins=logins, outdir=outdir, max_upload_mb=args.max_upload_mb,
                    listen=args.listen, allowed_hosts=_comma_list(args.allowed_hosts), cors_origins=cors_origins,
                    engine=engine, api_logins=parse_api_logins(args.api_auth), queue_size=args.queue_size)

    try:
        sock = _bind(host, args.port)
    except OSError as e:  # e.g. the port is taken
        print(f"error: cannot serve on {host}:{args.port}: {e.strerror or e}".splitlines()[0], file=sys.stderr)
        return EXIT_FAILURE

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5,
                                           http=guarded_http_protocol()))
    threading.Thread(target=_announce, args=(server, args, host, bool(logins)), name="easel-announce",
                     daemon=True).start()
    server.run(sockets=[sock])  # until Ctrl+C or SIGTERM
    return 0


def _announce(server, args, host: str, has_logins: bool) -> None:
    """Once the server listens: print where to reach it (and on the network), open a browser tab."""
    while not server.started and not server.should_exit:
        threading.Event().wait(0.05)
    if not server.started:
        return
    local = "127.0.0.1" if host in (ANY_ADDRESS, "::") else host
    url = f"http://{local}:{args.port}"
    print(f"Easel is running at {url}  (Ctrl+C to stop)", flush=True)
    if args.listen:
        for address in lan_addresses() if host == ANY_ADDRESS else [host]:
            print(f"On your network: http://{address}:{args.port}", flush=True)
        if not has_logins:
            print("warning: no login required (--insecure-no-auth): anyone who can reach this machine can use it",
                  file=sys.stderr, flush=True)
    if not args.no_browser and has_display():
        webbrowser.open(url)


def build_app(page, *, logins, outdir: Path, max_upload_mb: int, listen: str | None = None,
              allowed_hosts=(), cors_origins: frozenset[str] = frozenset(), limiter=None, engine=None,
              api_logins=(), queue_size: int = 16):
    """The ASGI app: the HTTP API (ui/api.py, when an engine is given) and the page mounted at /
    inside our FastAPI app, all of it behind RequestGuard. The API takes the page's logins and
    `api_logins`, as HTTP Basic credentials."""
    import gradio as gr
    from fastapi import FastAPI
    from fastapi.middleware.cors import CORSMiddleware

    from ui.security import (BODY_OVERHEAD, GuardPolicy, LoginLimiter, RequestGuard, UnicodeBodyCheck,
                             allowed_hosts_for)

    # FastAPI's own /docs and /openapi.json are off: the API serves them behind its credentials.
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None, title="Easel",
                  description="AUTOMATIC1111-compatible HTTP API (/sdapi/v1)")
    limiter = limiter or LoginLimiter()  # wrong passwords count alike on the page's login and the API
    # Gradio adds its own CORS handling unless the parent app has a CORSMiddleware: this one
    # allows exactly the origins the user listed (none by default).
    app.add_middleware(CORSMiddleware, allow_origins=sorted(cors_origins), allow_credentials=True,
                       allow_methods=["*"], allow_headers=["*"])
    max_bytes = max_upload_mb * 1024 * 1024
    if engine is not None:  # before the page: its mount at / would take every path
        from ui.api import create_api

        app.include_router(create_api(engine, logins=[*logins, *api_logins], limiter=limiter, queue_size=queue_size))
    gr.mount_gradio_app(
        app, page, path="/",
        auth=logins or None,
        auth_message="Easel: log in with a user:password given to --auth or --auth-file" if logins else None,
        allowed_paths=[str(outdir)],
        show_error=False,   # unexpected errors say "Error", never a traceback; EaselErrors are shown as gr.Error
        max_file_size=max_bytes,
        ssr_mode=False,     # no Node server
        mcp_server=False,
        enable_monitoring=False,
        footer_links=["settings"],
        run_history=False,
    )
    policy = GuardPolicy(allowed_hosts=allowed_hosts_for(listen, allowed_hosts), cors_origins=cors_origins,
                         max_body_bytes=max_bytes + BODY_OVERHEAD)
    # The API's JSON bodies are checked for lone surrogates as a whole (it echoes fields it does not
    # read); the page's reach its handlers, whose request validation refuses them by field name.
    return RequestGuard(UnicodeBodyCheck(app, path_prefixes=("/sdapi/",)), policy, limiter)


def guarded_http_protocol():
    """uvicorn's HTTP/1.1 protocol (h11), whose own answers carry the protective headers too.

    The guard adds them to every answer the app gives, but uvicorn answers a request h11 cannot
    parse (no or two Host headers, a Content-Length that is not a number, a malformed request
    line) with a 400 of its own before any app runs. h11 is always installed with uvicorn; it is
    named here instead of "auto" (which prefers httptools when present) so the answer is ours."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    from ui.security import SECURITY_HEADERS

    class GuardedH11Protocol(H11Protocol):
        def send_400_response(self, msg: str) -> None:
            body = msg.encode("ascii", "replace")
            headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode()),
                       (b"connection", b"close"), *SECURITY_HEADERS]
            for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                          h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()

    return GuardedH11Protocol


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock
