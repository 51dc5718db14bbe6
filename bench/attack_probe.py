"""Try the hardening issue's attacks against a real `app.py serve --demo` and print what happened.

    venv/bin/python bench/attack_probe.py

Starts the server on a free loopback port with a login, then, as a page on another site (or a
DNS-rebinding one) would: calls the private settings event with a foreign Host and Origin,
uploads a 12000x12000 PNG (a few hundred KB on disk) to PNG info, then sends 30 wrong passwords. Prints
each answer, the time taken and the server's memory. Traffic goes to 127.0.0.1 only.
"""
from __future__ import annotations

import io
import sys
import tempfile
import time
from pathlib import Path

import psutil
import requests
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.browser_helpers import LOOPBACK, start_server  # noqa: E402

USER, PASSWORD = "user", "pass"


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def settings_event(session: requests.Session, url: str) -> int:
    config = session.get(url + "/config", timeout=30).json()
    elem = {c["id"]: c.get("props", {}).get("elem_id") for c in config["components"]}
    return next(d["id"] for d in config["dependencies"] if any(elem.get(t[0]) == "settings-save" for t in d["targets"]))


def pixel_bomb(side: int = 12000) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (side, side), 0).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="easel-attack-"))
    server = start_server(tmp, "--demo", "--listen", LOOPBACK, "--auth", f"{USER}:{PASSWORD}")
    pid = server.process.pid
    try:
        port = server.url.rsplit(":", 1)[1]
        own = requests.Session()
        own.post(server.url + "/login", data={"username": USER, "password": PASSWORD}, timeout=30)
        fn = settings_event(own, server.url)
        settings = tmp / "data" / "settings.json"
        before = settings.read_bytes() if settings.exists() else b""
        body = {"fn_index": fn, "data": [str(tmp / "attacker"), False], "session_hash": "x"}
        for label, headers in [("rebinding (Host evil.example, Origin evil)",
                                {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"}),
                               ("cross-origin (Origin evil)", {"Origin": "http://evil.example"})]:
            r = own.post(server.url + "/gradio_api/run/predict", json=body, headers=headers, timeout=30)
            after = settings.read_bytes() if settings.exists() else b""
            print(f"{label}: HTTP {r.status_code}; settings.json {'unchanged' if after == before else 'CHANGED'}; "
                  f"ACAO header: {r.headers.get('access-control-allow-origin')}")
        page = own.get(server.url + "/", timeout=30)
        print("page headers:", {k: page.headers.get(k) for k in ("x-frame-options", "x-content-type-options",
                                                                 "referrer-policy", "cross-origin-resource-policy")})

        from gradio_client import Client, handle_file

        bomb = tmp / "bomb.png"
        bomb.write_bytes(pixel_bomb())
        client = Client(server.url, auth=(USER, PASSWORD), verbose=False)
        rss_before = rss_mb(pid)
        started = time.perf_counter()
        try:
            client.predict(handle_file(str(bomb)), api_name="/png_info")
            outcome = "accepted"
        except Exception as e:  # noqa: BLE001 - the refusal comes back as the client's error
            outcome = f"refused: {str(e).splitlines()[0][:160]}"
        print(f"12000x12000 PNG ({bomb.stat().st_size / 1024:.0f} KB) to PNG info: {outcome}; "
              f"{time.perf_counter() - started:.2f} s; server RSS {rss_before:.0f} -> {rss_mb(pid):.0f} MB")
        still = own.get(server.url + "/config", timeout=30).status_code
        print(f"server still serving: HTTP {still}")
        started = time.perf_counter()
        codes = [requests.post(server.url + "/login", data={"username": USER, "password": f"wrong{i}"},
                               timeout=30).status_code for i in range(30)]
        right = requests.post(server.url + "/login", data={"username": USER, "password": PASSWORD}, timeout=30)
        print(f"30 wrong passwords in {time.perf_counter() - started:.2f} s: "
              f"{codes.count(400)} answered 400, {codes.count(429)} answered 429; then the right one: "
              f"HTTP {right.status_code} {right.json().get('detail', '')}")

    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
