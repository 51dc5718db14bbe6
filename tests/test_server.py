"""`app.py serve` as a real process: refusing unsafe starts, and the login on loopback."""
from __future__ import annotations

import argparse
import http.client
import ipaddress
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests

from tests.browser_helpers import LOOPBACK, REPO, free_port, serve_command, start_server
import ui.server
from ui.server import add_serve_options, lan_addresses, parse_logins, serve


def refused(tmp_path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(serve_command(tmp_path, free_port(), "--demo", *extra), cwd=REPO, capture_output=True,
                          text=True, timeout=180)


def test_listen_without_auth_refuses_to_start(tmp_path):
    result = refused(tmp_path, "--listen")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --listen")
    assert "--auth" in lines[0]


def serve_args(*argv: str):
    parser = argparse.ArgumentParser()
    parser.add_argument("--outdir", default="outputs")
    add_serve_options(parser)
    return parser.parse_args(argv)


@pytest.mark.parametrize("argv, message", [
    (("--auth", "no-colon"), "error: --auth: expected user:password"),
    (("--auth", "user:"), "error: --auth: expected user:password"),
    (("--auth-file", "/nonexistent/logins.txt"), "error: --auth-file: cannot read"),
    (("--listen", "--insecure-no-auth", "--queue-size", "0"), "error: --queue-size: must be at least 1"),
    (("--cors-allow-origins", "evil.example"), "error: --cors-allow-origins: 'evil.example' is not an http(s) origin"),
    (("--cors-allow-origins", "https://ok.example,javascript:alert(1)"), "error: --cors-allow-origins: 'javascript"),
])
def test_bad_serve_option_refuses_to_start_with_one_line(argv, message, capsys):
    assert serve(None, serve_args(*argv)) == 2  # refused before the engine is touched
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_auth_file_lines_are_logins(tmp_path):
    (tmp_path / "logins.txt").write_text("# comment\n\nalice:wonder\nbob:se:cret\n")
    assert parse_logins("carol:x", tmp_path / "logins.txt") == [("carol", "x"), ("alice", "wonder"), ("bob", "se:cret")]


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("auth-server")
    (tmp / "logins.txt").write_text("# who may log in\nalice:wonder\n")
    server = start_server(tmp, "--demo", "--listen", LOOPBACK, "--auth", "user:pass", "--auth-file",
                          str(tmp / "logins.txt"), "--max-upload-mb", "1")
    yield server
    server.stop()


def login(server, user: str, password: str) -> requests.Session:
    session = requests.Session()
    session.post(server.url + "/login", data={"username": user, "password": password}, timeout=10)
    return session


def test_listen_prints_the_network_url(auth_server):
    # The page answers a moment before the URLs are printed: give the server a few seconds.
    deadline = time.monotonic() + 30
    while f"On your network: {auth_server.url}" not in auth_server.log_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert f"On your network: {auth_server.url}" in auth_server.log_text()


def test_unauthenticated_request_is_rejected(auth_server):
    assert requests.get(auth_server.url + "/config", timeout=10).status_code == 401


def test_wrong_password_is_rejected(auth_server):
    response = requests.post(auth_server.url + "/login", data={"username": "user", "password": "nope"}, timeout=10)
    assert response.status_code in (400, 401)
    assert login(auth_server, "user", "nope").get(auth_server.url + "/config", timeout=10).status_code == 401


@pytest.mark.parametrize("user, password", [("user", "pass"), ("alice", "wonder")])
def test_logged_in_user_gets_the_page_config(auth_server, user, password):
    response = login(auth_server, user, password).get(auth_server.url + "/config", timeout=10)
    assert response.status_code == 200
    assert response.json()["title"] == "Easel"


def test_files_outside_the_output_folder_are_not_served(auth_server):
    session = login(auth_server, "user", "pass")
    for path in (REPO / "app.py", auth_server.log):
        assert session.get(f"{auth_server.url}/gradio_api/file={path}", timeout=10).status_code == 403


def placed_in_outputs(server, name: str) -> tuple[Path, bytes]:
    """A file put in the server's outputs folder, as a saved image would be."""
    path = server.outdir / "txt2img" / "2000-01-01" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    data = b"\x89PNG\r\n\x1a\n" + name.encode() * 50
    path.write_bytes(data)
    return path, data


def raw_get(server, path: str, session: requests.Session) -> tuple[int, bytes]:
    """GET with the path sent byte for byte: requests/urllib3 would resolve `..` before sending."""
    parts = urlsplit(server.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    cookie = "; ".join(f"{c.name}={c.value}" for c in session.cookies)
    conn.request("GET", path, headers={"Cookie": cookie} if cookie else {})
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, body


def test_a_file_inside_the_output_folder_is_served_to_a_logged_in_user(auth_server):
    path, data = placed_in_outputs(auth_server, "00001-7.png")
    session = login(auth_server, "user", "pass")
    for route in ("/gradio_api/file=", "/gradio_api/file/"):
        status, body = raw_get(auth_server, f"{route}{path}", session)
        assert (status, body) == (200, data), route
    assert raw_get(auth_server, f"/gradio_api/file={path}", requests.Session())[0] == 401


@pytest.mark.parametrize("dots", ["..", "%2e%2e", "%2E%2E"])
def test_dot_dot_out_of_the_output_folder_is_refused(auth_server, dots):
    placed_in_outputs(auth_server, "00002-8.png")  # the folder the path climbs out of exists
    secret = auth_server.outdir.parent / "secret.txt"  # next to the outputs folder, not in it
    secret.write_text("not for the web")
    session = login(auth_server, "user", "pass")
    for route in ("/gradio_api/file=", "/gradio_api/file/"):
        climb = f"{route}{auth_server.outdir}/txt2img/{dots}/{dots}/secret.txt"
        status, body = raw_get(auth_server, climb, session)
        assert b"not for the web" not in body, climb
        assert status in (400, 403, 404), (climb, status)


def upload(session, server, size: int) -> requests.Response:
    return session.post(server.url + "/gradio_api/upload", files={"files": ("x.png", b"\0" * size)}, timeout=30)


def test_uploads_need_a_login(auth_server):
    assert upload(requests.Session(), auth_server, 1000).status_code == 401


def test_uploads_over_the_size_cap_are_refused(auth_server):
    session = login(auth_server, "user", "pass")
    assert upload(session, auth_server, 1000).status_code == 200
    assert upload(session, auth_server, 2 * 1024 * 1024).status_code == 413


def raw_exchange(server, request: bytes) -> tuple[int, dict[str, list[str]]]:
    """Send bytes as they are (no client library would send these) and read the answer's status
    and headers, until the server closes or the head is complete."""
    parts = urlsplit(server.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as conn:
        conn.sendall(request)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = conn.recv(65536)
            if not chunk:
                break
            answer += chunk
    head = answer.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    assert head[0].startswith("HTTP/1.1 "), answer[:300]
    headers: dict[str, list[str]] = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    return int(head[0].split()[1]), headers


def bad_requests(port: int) -> list[tuple[str, bytes, int]]:
    host = f"Host: {LOOPBACK}:{port}\r\n".encode()
    return [  # (what is wrong, the request, who answers: 400 the HTTP server itself, 403 the guard)
        ("no Host", b"GET / HTTP/1.1\r\n\r\n", 400),
        ("two Hosts", b"GET / HTTP/1.1\r\n" + host + b"Host: evil.example\r\n\r\n", 400),
        ("a space before Host's colon", b"GET / HTTP/1.1\r\nHost : 127.0.0.1\r\n\r\n", 400),
        ("a control byte in Host", b"GET / HTTP/1.1\r\nHost: 127.0.0.1\x01\r\n\r\n", 403),
        ("a foreign Host", b"GET / HTTP/1.1\r\nHost: evil.example\r\n\r\n", 403),
        ("Content-Length a word", b"POST /login HTTP/1.1\r\n" + host + b"Content-Length: abc\r\n\r\n", 400),
        ("Content-Length negative", b"POST /login HTTP/1.1\r\n" + host + b"Content-Length: -1\r\n\r\n", 400),
        ("two Content-Lengths", b"POST /login HTTP/1.1\r\n" + host + b"Content-Length: 5\r\nContent-Length: 6"
                                b"\r\n\r\nhello", 400),
        ("a malformed request line", b"GET /\x00 HTTP/1.1\r\n" + host + b"\r\n", 400),
    ]


def test_answers_of_the_http_server_itself_carry_the_protective_headers(auth_server):
    from ui.security import SECURITY_HEADERS

    port = urlsplit(auth_server.url).port
    for what, request, status in bad_requests(port):
        got, headers = raw_exchange(auth_server, request)
        assert got == status, (what, got)
        for name, value in SECURITY_HEADERS:
            assert headers.get(name.decode()) == [value.decode()], (what, name, headers)
    assert requests.get(auth_server.url + "/config", timeout=10).status_code == 401  # still serving


class FakeUdpSocket:
    """socket.socket stand-in for lan_addresses' routing question: says which local address it got."""

    def __init__(self, local: str | None):
        self.local = local

    def __call__(self, *args):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def connect(self, address):
        if self.local is None:
            raise OSError("Network is unreachable")

    def getsockname(self):
        return (self.local, 40000)


def fake_network(monkeypatch, host_addresses, routed: str | None):
    def getaddrinfo(host, port, family=0, *args):
        if host_addresses is None:
            raise socket.gaierror("no such host")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, 0)) for a in host_addresses]

    monkeypatch.setattr(ui.server.socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(ui.server.socket, "socket", FakeUdpSocket(routed))


def test_lan_addresses_are_the_hosts_and_the_routed_ones_without_loopback(monkeypatch):
    fake_network(monkeypatch, ["127.0.1.1", "192.168.1.20", "192.168.1.20", "0.0.0.0"], "10.0.0.5")
    assert lan_addresses() == ["10.0.0.5", "192.168.1.20"]


def test_lan_addresses_use_the_routed_address_when_the_host_name_does_not_resolve(monkeypatch):
    fake_network(monkeypatch, None, "172.16.4.2")
    assert lan_addresses() == ["172.16.4.2"]


def test_lan_addresses_are_empty_with_only_loopback_and_no_route(monkeypatch):
    fake_network(monkeypatch, ["127.0.0.1", "127.0.1.1"], None)
    assert lan_addresses() == []


def test_lan_addresses_on_this_machine_are_its_own_ipv4_addresses():
    """Each address found can be bound here (it is this machine's); a machine with no network at all
    may have none, but this one has its routed address unless it has no IPv4 route."""
    addresses = lan_addresses()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            routed = s.getsockname()[0]
    except OSError:
        routed = None
    if routed and not routed.startswith("127."):
        assert routed in addresses
    for address in addresses:
        assert ipaddress.ip_address(address).version == 4 and not address.startswith("127.")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((address, 0))  # EADDRNOTAVAIL if it were not one of this machine's addresses


@pytest.fixture(scope="module")
def one_slot_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("queue-server")
    server = start_server(tmp, "--demo", "--queue-size", "1")
    yield server
    server.stop()


def test_a_job_beyond_the_queue_size_is_refused_and_the_queued_ones_finish(one_slot_server, tmp_path):
    from gradio_client import Client
    from gradio_client.utils import Status

    server = one_slot_server
    info = requests.get(server.url + "/gradio_api/info", timeout=30).json()
    names = {p["label"]: p["parameter_name"] for p in info["named_endpoints"]["/txt2img"]["parameters"]}

    def args(prompt, seed, steps, size):
        return {names["Prompt"]: prompt, names["Negative prompt"]: "", names["Steps"]: steps, names["Width"]: size,
                names["Height"]: size, names["Seed (-1: random)"]: seed}

    def wait_for(job, codes):
        deadline = time.monotonic() + 300
        while job.status().code not in codes and not job.done() and time.monotonic() < deadline:
            time.sleep(0.05)
        return job.status().code

    client = Client(server.url, verbose=False, download_files=str(tmp_path / "client"))
    # The one running job: long enough (256x256, 12 steps) to still run while the others arrive.
    running = client.submit(**args("running", 101, 12, 256), api_name="/txt2img")
    assert wait_for(running, {Status.PROCESSING, Status.PROGRESS, Status.ITERATING}) in (
        Status.PROCESSING, Status.PROGRESS, Status.ITERATING)
    waiting = Client(server.url, verbose=False, download_files=str(tmp_path / "c2")).submit(
        **args("waiting", 202, 2, 64), api_name="/txt2img")
    assert wait_for(waiting, {Status.IN_QUEUE}) == Status.IN_QUEUE  # the queue's one place is taken
    refused = Client(server.url, verbose=False, download_files=str(tmp_path / "c3")).submit(
        **args("refused", 303, 2, 64), api_name="/txt2img")
    with pytest.raises(Exception, match="Queue is full"):
        refused.result(timeout=120)
    assert not running.done()  # the refusal came while the queue really was full
    assert running.result(timeout=600)[3].startswith("running\n")
    assert waiting.result(timeout=600)[3].startswith("waiting\n")
    saved = sorted(p.name for p in server.outdir.rglob("*.png"))
    assert [n[-8:] for n in saved] == ["-101.png", "-202.png"]
