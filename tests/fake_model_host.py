"""A fake model host on loopback for the download tests (never the internet).

It answers like huggingface.co for `/{repo}/resolve/{revision}/{file}` (a redirect to `/cdn/{sha256}`
on `localhost`, another host name as the hub's CDN is, carrying X-Repo-Commit, X-Linked-Etag and X-Linked-Size, as the hub does for LFS files) and serves
plain files under `/files/`, all with Range support and an ETag. Over https with a certificate made
by `trustme`, or plain http. `pause_after` makes the first GET of a file stop after that many bytes
until `release` is set (a download caught halfway), then hang up or (`finish_after_pause`) go on; every request is recorded with its Range.
"""
from __future__ import annotations

import hashlib
import http.server
import json
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK = "127.0.0.1"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class Served:
    data: bytes
    headers: dict = field(default_factory=dict)   # extra response headers (e.g. Content-Disposition)
    claimed_size: int | None = None                # a Content-Length that is not the truth (sends nothing)


class FakeModelHost(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, tls_dir: Path | None = None):
        self.files: dict[str, Served] = {}            # "/files/x.safetensors" or "/cdn/<sha>"
        self.hub: dict[str, str] = {}                 # "/repo/resolve/main/file" -> sha256
        self.redirects: dict[str, str] = {}           # path -> absolute Location
        self.requests: list[tuple[str, str, str | None]] = []   # (method, path, Range header)
        self.pause_after: int | None = None
        self.finish_after_pause = False               # after `release`: send the rest (True) or hang up
        self.release = threading.Event()
        self.ca_file: Path | None = None
        super().__init__((LOOPBACK, 0), _Handler)
        if tls_dir is not None:
            import trustme

            ca = trustme.CA()
            ca.issue_cert(LOOPBACK, "localhost").configure_cert(context := ssl.create_default_context(ssl.Purpose.CLIENT_AUTH))
            self.ca_file = Path(tls_dir) / "fake-host-ca.pem"
            ca.cert_pem.write_to_path(str(self.ca_file))
            self.socket = context.wrap_socket(self.socket, server_side=True)
        self.scheme = "https" if tls_dir is not None else "http"
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    def handle_error(self, request, client_address):
        pass  # a client that hangs up mid-file (refused, cancelled, killed) is what these tests do

    @property
    def url(self) -> str:
        return f"{self.scheme}://{LOOPBACK}:{self.server_address[1]}"

    def add_file(self, name: str, data: bytes, **headers) -> str:
        self.files[f"/files/{name}"] = Served(data, headers)
        return f"{self.url}/files/{name}"

    def add_hub_file(self, repo: str, filename: str, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        self.hub[f"/{repo}/resolve/main/{filename}"] = sha
        self.files[f"/cdn/{sha}"] = Served(data, {"Content-Disposition": f'attachment; filename="{filename}"'})
        return sha

    def ranges_seen(self) -> list[str]:
        return [r for _, _, r in self.requests if r]

    def start(self) -> "FakeModelHost":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release.set()
        self.shutdown()
        self.server_close()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self._answer(body=False)

    def do_GET(self):
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        host: FakeModelHost = self.server
        path = self.path.split("?")[0]
        host.requests.append((self.command, path, self.headers.get("Range")))
        if path in host.redirects:
            return self._reply(302, {"Location": host.redirects[path]})
        if path in host.hub:
            sha = host.hub[path]
            size = len(host.files[f"/cdn/{sha}"].data)
            cdn = host.url.replace(LOOPBACK, "localhost")  # another host, as the hub's CDN is
            return self._reply(302, {"Location": f"{cdn}/cdn/{sha}", "X-Repo-Commit": COMMIT,
                                     "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(size), "ETag": '"pointer"'})
        served = host.files.get(path)
        if served is None:
            return self._reply(404, {})
        data, status, headers = served.data, 200, {"ETag": f'"{hashlib.sha256(served.data).hexdigest()}"',
                                                   "Accept-Ranges": "bytes", **served.headers}
        ranged = self.headers.get("Range", "")
        if ranged.startswith("bytes=") and served.claimed_size is None:
            start = int(ranged[6:].split("-")[0])
            if start >= len(data):
                return self._reply(416, {"Content-Range": f"bytes */{len(data)}"})
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            data, status = data[start:], 206
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(served.claimed_size or len(data)))
        self.end_headers()
        if not body or served.claimed_size is not None:
            self.close_connection = served.claimed_size is not None
            return
        pause = host.pause_after
        if pause is not None and status == 200:
            host.pause_after = None  # only the first download is caught halfway
            self.wfile.write(data[:pause])
            self.wfile.flush()
            host.release.wait(60)
            if host.finish_after_pause:
                self.wfile.write(data[pause:])
                return
            self.close_connection = True  # closes short of Content-Length
            return
        self.wfile.write(data)

    def _reply(self, status: int, headers: dict) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", "0")
        self.end_headers()


def tiny_turbo_catalog(path: Path, payload: bytes) -> Path:
    """A one-entry download catalogue at `path`: "tiny-turbo", `payload` as the hub file
    test/tiny/tiny-turbo.safetensors (served by `FakeModelHost.add_hub_file`)."""
    path.write_text(json.dumps({"models": [{
        "name": "tiny-turbo", "title": "Tiny turbo", "kind": "checkpoint", "family": "sd2", "repo_id": "test/tiny",
        "file": "tiny-turbo.safetensors", "folder": "Stable-diffusion", "size": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(), "licence": {"name": "test", "url": "https://example.invalid/l"},
        "good_for": "tests", "gpu_gb": 1, "ram_gb": 1, "gpu": "ok", "why_gpu": "small", "cpu": "recommended",
        "why_cpu": "few steps"}]}))
    return path
