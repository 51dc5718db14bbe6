"""Bad images through the running server's own door (the page's PNG info event over HTTP): each is
refused with the engine's one-line message, and the server goes on serving."""
from __future__ import annotations

import io

import pytest
import requests
from PIL import Image

from tests.browser_helpers import start_server
from tests.test_bad_input import forged_png, zero_bomb_png


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("bad-input-server"), "--demo")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server.url, verbose=False)


def png_info(client, tmp_path, data: bytes, name: str = "upload.png"):
    from gradio_client import handle_file

    path = tmp_path / name
    path.write_bytes(data)
    return client.predict(handle_file(str(path)), api_name="/png_info")


@pytest.mark.parametrize("data, words", [
    (forged_png(20000, 20000), "400000000 pixels"),   # over twice Pillow's own limit: Gradio's check is not hit
    (zero_bomb_png(12000), "12000x12000"),           # the 420 KB PNG that took 26 s and 4.8 GB
    (b"", "empty"),
    (b"not an image at all", "not an image"),
])
def test_a_bad_upload_is_refused_with_the_engines_line(client, tmp_path, data, words):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as refused:
        png_info(client, tmp_path, data)
    message = str(refused.value)
    assert message.startswith("image:") and words in message and "\n" not in message.strip()


def test_the_server_keeps_serving_after_bad_uploads(server, client, tmp_path):
    from gradio_client.exceptions import AppError

    for data in (forged_png(20000, 20000), zero_bomb_png(12000)):
        with pytest.raises(AppError):
            png_info(client, tmp_path, data)
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buffer, format="PNG")
    text, watermark = png_info(client, tmp_path, buffer.getvalue(), "fine.png")
    assert "no generation parameters" in text
    assert requests.get(server.url + "/config", timeout=30).status_code == 200


def test_a_pasted_image_reaches_the_handler_undecoded(tmp_path):
    import base64

    from gradio.data_classes import ImageData

    from ui.app_ui import uploaded_image

    upload = uploaded_image()
    bomb = forged_png(20000, 20000)
    path = upload.preprocess(ImageData(url="data:image/png;base64," + base64.b64encode(bomb).decode()))
    with open(path, "rb") as f:
        assert f.read() == bomb  # written as sent: nothing decoded it on the way


def test_an_uploaded_file_reaches_the_handler_as_its_path(tmp_path):
    from gradio.data_classes import ImageData

    from ui.app_ui import uploaded_image

    (tmp_path / "x.png").write_bytes(b"")
    assert uploaded_image().preprocess(ImageData(path=str(tmp_path / "x.png"))) == str(tmp_path / "x.png")
