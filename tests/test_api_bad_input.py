"""The bad-input table of tests/test_bad_input.py through its third door, the HTTP API: each case
is sent to a running server as A1111 JSON and must come back as HTTP 422 naming the A1111 field in
one line; nothing is saved, and the server goes on serving."""
from __future__ import annotations

import base64
import io
import json

import pytest
import requests
from PIL import Image

from tests.browser_helpers import start_server
from tests.test_bad_input import B64_CASES, BAD_FILES, FILE_WORDS, IMG2IMG, REQUEST_CASES, SMALL

# Engine field -> the A1111 field the API takes it as.
API_NAMES = {"sampler": "sampler_name", "schedule_type": "scheduler", "batch_count": "n_iter",
             "init_image": "init_images"}
# Cases with no API equivalent, or that A1111's API accepts (and so does Easel's):
NOT_FOR_THE_API = {
    "unknown-field": "A1111 ignores fields it does not know; reported in info.ignored (test_api)",
    "unknown-mode": "the mode is the endpoint",
    "txt2img-with-image": "txt2img has no init_images field (an extra field is ignored)",
    "resize-mode-number": "1 is A1111's number for crop and resize",
    "empty-sampler": "A1111 falls back to sampler_index when sampler_name is empty",
    "empty-schedule": "A1111 takes an empty scheduler as automatic",
    "save-grid-number": "the API's grid field is do_not_save_grid, which Easel ignores",
    "prompt-bytes": "JSON has no bytes",
    "steps-float": "A1111's API cuts 2.5 steps to 2 (test_api_inpaint's leniency tests); the page refuses it",
}


def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def api_body(fields: dict) -> tuple[str, dict]:
    """(endpoint, A1111 JSON body) for request fields of the table."""
    fields = dict(fields)
    endpoint = "img2img" if fields.pop("mode", "txt2img") == "img2img" else "txt2img"
    body = {}
    for name, value in fields.items():
        if name == "init_image":
            body["init_images"] = [b64(value) if isinstance(value, Image.Image) else value]
        else:
            body[API_NAMES.get(name, name)] = value
    return endpoint, body


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("api-bad-input"), "--demo")
    yield server
    server.stop()


def saved(server) -> set:
    return set(server.outdir.rglob("*")) if server.outdir.exists() else set()


def assert_422(response: requests.Response, field: str, words: str = "") -> None:
    assert response.status_code == 422, response.text[:500]
    detail = response.json()["detail"][0]
    assert detail["loc"] == ["body", field], detail
    message = detail["msg"]
    assert message.startswith(f"{field}: ") and "\n" not in message and "\r" not in message, message
    assert words.lower() in message.lower() and message.isprintable(), message


API_CASES = [c for c in REQUEST_CASES if c[0] not in NOT_FOR_THE_API]


@pytest.mark.parametrize("fields,field", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_api_refuses_bad_request_with_422_naming_the_field(server, fields, field):
    before = saved(server)
    endpoint, body = api_body({**SMALL, "save_images": True, **fields})
    # json.dumps writes NaN/Infinity as the tokens some clients send (requests' json= refuses them)
    response = requests.post(f"{server.url}/sdapi/v1/{endpoint}", data=json.dumps(body), timeout=120,
                             headers={"Content-Type": "application/json"})
    assert_422(response, API_NAMES.get(field, field))
    assert saved(server) == before


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_api_refuses_bad_init_image(server, case):
    before = saved(server)
    endpoint, body = api_body({**IMG2IMG, "save_images": True})
    body["init_images"] = [base64.b64encode(BAD_FILES[case][0]).decode()]
    assert_422(requests.post(f"{server.url}/sdapi/v1/{endpoint}", json=body, timeout=120), "init_images",
               FILE_WORDS[case])
    assert saved(server) == before


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_api_png_info_refuses_bad_file(server, case):
    body = {"image": base64.b64encode(BAD_FILES[case][0]).decode()}
    assert_422(requests.post(f"{server.url}/sdapi/v1/png-info", json=body, timeout=120), "image", FILE_WORDS[case])


B64_API_CASES = [c for c in B64_CASES if isinstance(c[1], (str, int)) and c[0] != "base64-over-size"]


@pytest.mark.parametrize("text,words", [c[1:] for c in B64_API_CASES], ids=[c[0] for c in B64_API_CASES])
def test_api_refuses_bad_base64(server, text, words):
    assert_422(requests.post(f"{server.url}/sdapi/v1/png-info", json={"image": text}, timeout=120), "image", words)


def test_a_base64_image_over_the_upload_limit_is_refused_before_it_is_read(server):
    response = requests.post(f"{server.url}/sdapi/v1/png-info", timeout=120,
                             data=b'{"image": "' + b"A" * (52 * 1024 * 1024) + b'"}',
                             headers={"Content-Type": "application/json"})
    assert response.status_code == 413


@pytest.mark.parametrize("endpoint, body, field", [
    # What the probe sent: HTTP 500 (the tokenizer's TypeError) before issue 20's fix.
    ("txt2img", '{"prompt": "a\\ud800b", "steps": 1, "width": 64, "height": 64}', "prompt"),
    # Fields Easel does not read, but echoes back in the answer's "parameters".
    ("txt2img", '{"prompt": "a", "styles": ["\\udc00"]}', "styles.0"),
    ("txt2img", '{"prompt": "a", "hr_prompt": "x\\ud800"}', "hr_prompt"),
    ("txt2img", '{"prompt": "a", "comments": {"note": "\\udfff"}}', "comments.note"),
    ("txt2img", '{"prompt": "a", "override_settings": {"sd_model_checkpoint": "\\ud800"}}',
     "override_settings.sd_model_checkpoint"),
    ("img2img", '{"prompt": "a", "script_name": "\\ud800"}', "script_name"),
    ("png-info", '{"image": "\\ud800"}', "image"),
    ("extra-single-image", '{"image": "", "upscaler_1": "\\ud800"}', "upscaler_1"),
])
def test_api_refuses_a_lone_surrogate_in_any_text_field_with_422(server, endpoint, body, field):
    before = saved(server)
    response = requests.post(f"{server.url}/sdapi/v1/{endpoint}", data=body, timeout=120,
                             headers={"Content-Type": "application/json"})
    assert response.status_code == 422, response.text[:500]
    detail = response.json()["detail"][0]
    assert detail["loc"] == ["body", *field.split(".")], detail
    assert detail["msg"].startswith(f"{field}: contains an unpaired surrogate U+D"), detail
    assert detail["msg"].endswith("; text must be valid Unicode") and detail["msg"].isprintable()
    assert saved(server) == before


def test_the_server_still_generates_after_the_bad_requests(server):
    response = requests.post(f"{server.url}/sdapi/v1/txt2img", json=SMALL, timeout=120)
    assert response.status_code == 200 and json.loads(response.json()["info"])["all_seeds"] == [SMALL["seed"]]
