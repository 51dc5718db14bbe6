"""Three real clients of A1111's API (Open WebUI, SillyTavern, AIYA), replayed call by call against a
real `app.py serve --demo` on loopback: the HTTP calls each sends in its default set-up and for one
generation, in its order, with its headers and its request bodies (tests/a1111_clients/<client>.json,
which name the repository, files and commit read), and assertions on exactly the fields of the answers
that the client reads (how it reads them is in each step's comment).

The one change to the clients' bodies: the tiny demo model gets 64x64 and 3 steps in place of the
clients' 512x512 and 20-50 steps; every other field is sent as the client sends it."""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
import requests
from PIL import Image

from tests.browser_helpers import start_server

DATA = Path(__file__).resolve().parent / "a1111_clients"
API = "/sdapi/v1"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def client(name: str) -> dict:
    return json.loads((DATA / f"{name}.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("a1111-clients")
    (root / "data").mkdir()
    # AIYA lists the styles of /prompt-styles and sends one back: a styles.csv as A1111 keeps it
    (root / "data" / "styles.csv").write_text(client("aiyabot")["styles_csv"], encoding="utf-8")
    server = start_server(root, "--demo")
    yield server
    server.stop()


def ok(response: requests.Response) -> requests.Response:
    assert response.status_code == 200, \
        f"{response.request.method} {response.url}: {response.status_code} {response.text[:500]}"
    return response


def png(data: str, size: tuple[int, int]) -> Image.Image:
    """An image of an answer's `images`, decoded as the clients do: plain base64 (Open WebUI also takes
    a data: URL, reading the MIME type before the comma; the others b64decode the whole string)."""
    assert isinstance(data, str)
    raw = base64.b64decode(data)
    assert raw.startswith(PNG_MAGIC)
    image = Image.open(io.BytesIO(raw))
    assert image.format == "PNG" and image.size == size
    return image


def size_of(body: dict) -> tuple[int, int]:
    return body["width"], body["height"]


def test_open_webui_automatic1111_engine(server):
    """open-webui/open-webui backend/open_webui/routers/images.py at 02530d501461ce58ab06231d7c2ef2024a141ddf
    (engine "automatic1111"; its default AUTOMATIC1111_API_AUTH '' makes every call carry
    'authorization: Basic ', which A1111 without --api-auth ignores)."""
    spec = client("open_webui")
    base, headers = server.url + API, spec["headers"]
    s = requests.Session()  # aiohttp session: one for all calls

    # verify_url: GET /options, r.raise_for_status()
    ok(s.get(f"{base}/options", headers=headers))

    # get_models: [{'id': model['title'], 'name': model['model_name']} for model in r.json()]
    models = ok(s.get(f"{base}/sd-models", headers=headers)).json()
    assert isinstance(models, list) and models
    for model in models:
        assert isinstance(model["title"], str) and isinstance(model["model_name"], str)

    # get_image_model: options['sd_model_checkpoint']
    options = ok(s.get(f"{base}/options", headers=headers)).json()
    assert isinstance(options, dict) and isinstance(options["sd_model_checkpoint"], str)

    # set_image_model (an admin picks a model in the list): GET /options, then POST the whole dict
    # back with sd_model_checkpoint replaced, r.raise_for_status()
    options = ok(s.get(f"{base}/options", headers=headers)).json()
    options["sd_model_checkpoint"] = models[0]["title"]
    ok(s.post(f"{base}/options", json=options, headers=headers))
    # next time: get_image_model reads options['sd_model_checkpoint'] and the settings page shows it
    # as the selected one of get_models' ids (titles); set_image_model compares the two
    after = ok(s.get(f"{base}/options", headers=headers)).json()
    titles = [m["title"] for m in ok(s.get(f"{base}/sd-models", headers=headers)).json()]
    assert after["sd_model_checkpoint"] in titles

    # image_generations: POST /txt2img; r.json(content_type=None); res['images'] each image data,
    # res['info'] stored with it as metadata
    body = spec["txt2img"]
    res = ok(s.post(f"{base}/txt2img", json=body, headers=headers)).json()
    assert isinstance(res["images"], list) and len(res["images"]) == body["batch_size"]
    for image in res["images"]:
        png(image, size_of(body))
    assert isinstance(res["info"], str)
    info = json.loads(res["info"])  # A1111's info is a JSON string
    assert info["prompt"] == body["prompt"]


def test_sillytavern_auto_source(server):
    """SillyTavern/SillyTavern src/endpoints/stable-diffusion.js and
    public/scripts/extensions/stable-diffusion/index.js at ba6f7b7a98cf7a5eaf4f0e81da9779a9a668ced4
    (source 'auto'; default auto_auth '' makes getBasicAuthHeader send 'Authorization: Basic ',
    trimmed to 'Basic' by node-fetch)."""
    spec = client("sillytavern")
    base, headers = server.url + API, spec["headers"]

    # /api/sd/ping: GET /options, result.ok
    ok(requests.get(f"{base}/options", headers=headers))

    # /api/sd/samplers: data.map(x => x.name); its default sampler is DDIM
    samplers = [x["name"] for x in ok(requests.get(f"{base}/samplers", headers=headers)).json()]
    assert all(isinstance(n, str) for n in samplers) and spec["txt2img"]["sampler_name"] in samplers

    # /api/sd/get-model: data['sd_model_checkpoint'] (if truthy it becomes the selected model, the
    # option of /api/sd/models whose value == title)
    current = ok(requests.get(f"{base}/options", headers=headers)).json()["sd_model_checkpoint"]
    listed = ok(requests.get(f"{base}/sd-models", headers=headers)).json()
    models = [{"value": x["title"], "text": x["title"]} for x in listed]
    assert models and (not current or current in [m["value"] for m in models])

    # /api/sd/upscalers: GET /upscalers and /latent-upscale-modes, x.name of each; its default
    # hr_upscaler 'Latent' is among them
    upscalers = [x["name"] for x in ok(requests.get(f"{base}/upscalers", headers=headers)).json()]
    latent = [x["name"] for x in ok(requests.get(f"{base}/latent-upscale-modes", headers=headers)).json()]
    assert all(isinstance(n, str) for n in upscalers + latent)
    assert spec["txt2img"]["hr_upscaler"] in upscalers + latent

    # /api/sd/schedulers: data.map(x => x.name); its default scheduler is 'normal'
    schedulers = [x["name"] for x in ok(requests.get(f"{base}/schedulers", headers=headers)).json()]
    assert spec["txt2img"]["scheduler"] in schedulers

    # /api/sd/vaes: data.map(x => x.model_name)
    vaes = ok(requests.get(f"{base}/sd-vae", headers=headers)).json()
    assert isinstance(vaes, list) and all(isinstance(x["model_name"], str) for x in vaes)

    # /api/sd/set-model (the model chosen in its list): POST /options {sd_model_checkpoint},
    # result.ok; then GET /progress until progress == 0.0 and state.job_count === 0 (10 tries)
    ok(requests.post(f"{base}/options", json={"sd_model_checkpoint": models[0]["value"]},
                     headers={**headers, "Content-Type": "application/json"}))
    for _ in range(10):
        progress = ok(requests.get(f"{base}/progress", headers=headers)).json()
        if progress["progress"] == 0.0 and progress["state"]["job_count"] == 0:
            break
    else:
        pytest.fail(f"/progress never idle: {progress}")
    # the next /api/sd/get-model and /api/sd/models: the model set is the one selected
    current = ok(requests.get(f"{base}/options", headers=headers)).json()["sd_model_checkpoint"]
    titles = [x["title"] for x in ok(requests.get(f"{base}/sd-models", headers=headers)).json()]
    assert current in titles

    # /api/sd/generate: POST /txt2img with the page's body as it came (url and auth included),
    # result.ok, then data.images[0] as a 'png'
    body = spec["txt2img"]
    result = ok(requests.post(f"{base}/txt2img", data=json.dumps(body),
                              headers={**headers, "Content-Type": "application/json"}))
    data = result.json()
    png(data["images"][0], size_of(body))


def test_aiyabot_start_up_and_one_drawing(server):
    """Kilvoctu/aiyabot core/settings.py (files_check -> populate_global_vars, authenticate_user) and
    core/stablecog.py (dream) at eb8ff684cd44fb9905d714db1abd69b3ef331edb (no --api-auth, no
    --gradio-auth: no credentials)."""
    spec = client("aiyabot")
    url = server.url

    # startup: GET /cmd-flags; 401 means --api-auth, 404 means no --api
    assert requests.get(url + API + "/cmd-flags").status_code == 200
    requests.head(url)  # must not raise
    # GET /version: json()['app'] == 'sd.next'; any error is caught and means A1111
    try:
        assert requests.get(url + API + "/version").json()["app"] != "sd.next"
    except (KeyError, ValueError):
        pass

    # authenticate_user: GET /config, status 401 means gradio auth; POST /login, answer ignored
    s = requests.Session()
    assert s.get(url + "/config").status_code != 401
    s.post(url + "/login")

    # the lists, read by these keys
    samplers = [x["name"] for x in ok(s.get(url + API + "/samplers")).json()]
    assert samplers and spec["txt2img"]["sampler_index"] in samplers
    styles = {x["name"]: (x["prompt"], x["negative_prompt"]) for x in ok(s.get(url + API + "/prompt-styles")).json()}
    assert styles == {"Watercolour": ("{prompt}, watercolour painting", "photo")}  # the styles.csv written
    facefix = [x["name"] for x in ok(s.get(url + API + "/face-restorers")).json()]
    assert all(isinstance(n, str) for n in facefix)
    embeddings = ok(s.get(url + API + "/embeddings")).json()
    for key in ("loaded", "skipped"):
        assert isinstance(embeddings[key], dict)
        for value in embeddings[key].values():
            assert isinstance(value["shape"], int)
    hypernetworks = ok(s.get(url + API + "/hypernetworks")).json()
    assert isinstance(hypernetworks, (list, dict))
    upscalers = [x["name"] for x in ok(s.get(url + API + "/upscalers")).json()]
    assert all(isinstance(n, str) for n in upscalers)
    models = ok(s.get(url + API + "/sd-models")).json()
    assert models
    for model in models:
        assert isinstance(model["filename"], str) and isinstance(model["title"], str)
        assert "hash" in model  # model['hash'] is stored in model_info
        assert isinstance(model.get("name") or model["model_name"], str)
    loras = ok(s.get(url + API + "/loras")).json()  # s7['alias'] (errors here are caught)
    assert all(isinstance(x["alias"], str) for x in loras)

    # GET /config again: .json() outside any try (a non-JSON answer stops the bot at start-up);
    # ['components'][i]['props']['elem_id'] inside one
    old_config = s.get(url + "/config").json()
    assert isinstance(old_config, dict)

    # dream: a new authenticate_user() session (GET /config, POST /login); data_model '' so no
    # POST /options; POST /txt2img, response.json()['images'], each b64decode'd and opened by PIL
    s = requests.Session()
    s.get(url + "/config")
    s.post(url + "/login")
    for style in spec["txt2img"]["styles"] + list(styles):  # its default 'None', then the style it listed
        body = {**spec["txt2img"], "styles": [style]}
        images = ok(s.post(url + API + "/txt2img", json=body)).json()["images"]
        assert len(images) == body["n_iter"] * body["batch_size"]
        for image in images:
            png(image, size_of(body))
            # PNG info: POST /png-info {image: data URL}; .json().get('info') is written as the
            # saved PNG's 'parameters' text, so it must be a str
            answer = ok(s.post(url + API + "/png-info", json={"image": "data:image/png;base64," + image}))
            info = answer.json().get("info")
            assert isinstance(info, str) and body["prompt"] in info

    # update_progress (live preview): progress_data.get('state').get('job'), .get('sampling_step')
    state = ok(s.get(url + API + "/progress")).json().get("state")
    assert isinstance(state.get("job"), str) and isinstance(state.get("sampling_step"), int)


def test_a_style_named_in_a_txt2img_body_is_applied_and_an_unknown_one_left_out(server):
    """A1111 applies `styles` from styles.csv ({prompt} placement) and leaves out a name it does
    not know (aiyabot's default "None")."""
    body = {"prompt": "a harbour", "negative_prompt": "", "steps": 2, "width": 64, "height": 64, "seed": 1,
            "styles": ["Watercolour", "None"]}
    info = json.loads(ok(requests.post(server.url + API + "/txt2img", json=body, timeout=300)).json()["info"])
    assert info["infotexts"][0].startswith("a harbour, watercolour painting\nNegative prompt: photo\n")
    assert info["styles"] == ["Watercolour", "None"] and "styles.None" in info["ignored"]


def test_styles_that_are_not_a_list_of_names_are_422_naming_it(server):
    response = requests.post(server.url + API + "/txt2img", json={"prompt": "x", "styles": "Watercolour"}, timeout=60)
    assert response.status_code == 422 and "styles" in response.text
