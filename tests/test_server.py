"""`app.py serve` as a real process: refusing unsafe starts, and the login on loopback."""
from __future__ import annotations

import argparse
import subprocess
import time

import pytest
import requests

from tests.browser_helpers import LOOPBACK, REPO, free_port, serve_command, start_server
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


def upload(session, server, size: int) -> requests.Response:
    return session.post(server.url + "/gradio_api/upload", files={"files": ("x.png", b"\0" * size)}, timeout=30)


def test_uploads_need_a_login(auth_server):
    assert upload(requests.Session(), auth_server, 1000).status_code == 401


def test_uploads_over_the_size_cap_are_refused(auth_server):
    session = login(auth_server, "user", "pass")
    assert upload(session, auth_server, 1000).status_code == 200
    assert upload(session, auth_server, 2 * 1024 * 1024).status_code == 413


def test_lan_addresses_are_ipv4_and_not_loopback():
    for address in lan_addresses():  # may be empty on a machine with no network
        assert len(address.split(".")) == 4 and not address.startswith("127.")
