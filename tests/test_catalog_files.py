"""Every entry of the bundled catalogue (engine/configs/catalog.json), end to end: its file is built
tiny in the layout its real source ships (same key names and nesting, tests/field_files.py and
tests/ldm_export.py), served by the fake host on loopback where the entry points (the hub's
resolve URL, or the direct link), downloaded through the page's code path
(ui.downloads_tab.run_download, what the Download button runs) and then used: a checkpoint
generates, an upscaler upscales. A catalogue entry that cannot be used after its download fails
here, not on a user's machine.

Only the sha256 and size differ from the bundled entry (the tiny file is not the real one), and an
entry's direct link is moved to the fake host with its file name kept. A tiny checkpoint's shapes
are not its family's shipped config's, so its `<file>.yaml` (A1111's sidecar) is written beside
it after the download; the real file loads with engine/configs/ (tests/test_checkpoints.py)."""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save as safetensors_bytes

from engine.catalog import CATALOG_PATH
from engine.downloads import DownloadJob
from engine.families import OPEN_CLIP_PREFIX, SDXL_REFINER_PREFIX, Family
from tests.fake_model_host import FakeModelHost
from tests.face_fixtures import draw_face, write_codeformer, write_gfpgan, write_yunet_onnx
from tests.field_files import realesrgan_x4plus
from tests.ldm_export import ldm_config, pipeline_to_ldm, write_yaml
from tests.tiny_models import tiny_pipeline

BUNDLED = json.loads(CATALOG_PATH.read_text(encoding="utf-8"))["models"]
SMALL = {"prompt": "a lighthouse at dusk", "steps": 2, "width": 64, "height": 64, "seed": 11, "cfg_scale": 5.0}


def ldm_checkpoint(family: Family):
    """The tiny model of `family` as the original single file (LDM / sgm key names), and its yaml."""
    pipe = tiny_pipeline(family)
    return pipeline_to_ldm(pipe, family), ldm_config(pipe, family)


def generative_models_layout(state: dict) -> dict:
    """SD 2.x as Stability's generative-models trainer saves it (sd_turbo.safetensors): the
    OpenCLIP text encoder under conditioner.embedders.0.model. instead of cond_stage_model.model."""
    return {SDXL_REFINER_PREFIX + k[len(OPEN_CLIP_PREFIX):] if k.startswith(OPEN_CLIP_PREFIX) else k: v
            for k, v in state.items()}


def pickle_bytes(write) -> bytes:
    buffer = io.BytesIO()
    write(buffer)
    return buffer.getvalue()


def written_bytes(write, name: str) -> bytes:
    """The bytes a tests/face_fixtures.py writer puts in a file called `name`."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        return write(Path(folder) / name).read_bytes()


# name -> () -> (the file's bytes, the sidecar yaml or None). One per bundled entry.
SHIPPED = {
    "sd15": lambda: (lambda s, y: (safetensors_bytes(s), y))(*ldm_checkpoint(Family.SD1)),
    "sd-turbo": lambda: (lambda s, y: (safetensors_bytes(generative_models_layout(s)), y))(*ldm_checkpoint(Family.SD2)),
    "sd21-768": lambda: (lambda s, y: (safetensors_bytes(s), y))(*ldm_checkpoint(Family.SD2_V)),
    "sdxl-base": lambda: (lambda s, y: (safetensors_bytes(s), y))(*ldm_checkpoint(Family.SDXL)),
    "sd-x4-upscaler": lambda: (lambda s, y: (safetensors_bytes(s), y))(*ldm_checkpoint(Family.SD_X4_UPSCALER)),
    "realesrgan-x4plus": lambda: (pickle_bytes(lambda f: realesrgan_x4plus(f)), None),
    # GFPGANv1.4.pth and codeformer.pth: a torch pickle of {"params_ema": state dict}.
    "gfpgan-1.4": lambda: (written_bytes(lambda p: write_gfpgan(p, half=True), "GFPGANv1.4.pth"), None),
    "codeformer": lambda: (written_bytes(lambda p: write_codeformer(p, half=True), "codeformer.pth"), None),
    "yunet-face-detector": lambda: (written_bytes(write_yunet_onnx, "face_detection_yunet_2023mar.onnx"), None),
}


def test_every_catalogue_entry_has_a_file_in_its_shipped_layout_here():
    assert sorted(SHIPPED) == sorted(e["name"] for e in BUNDLED)


@pytest.fixture(scope="module")
def hub():
    """The hub's side (resolve URLs) over plain http, as in tests/test_downloads.py; offline mode off."""
    import huggingface_hub.constants

    patch = pytest.MonkeyPatch()
    patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    patch.setenv("HF_HUB_OFFLINE", "0")
    server = FakeModelHost().start()
    yield server
    server.stop()
    patch.undo()


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    """Direct links (GitHub releases) over https: a link must be https at every hop."""
    server = FakeModelHost(tls_dir=tmp_path_factory.mktemp("tls")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def served(hub, host, tmp_path_factory):
    """Each entry's tiny file on the fake host, and a copy of the bundled catalogue pointing at it."""
    sidecars, entries = {}, []
    for item in BUNDLED:
        data, sidecars[item["name"]] = SHIPPED[item["name"]]()
        item = {**item, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        if item.get("repo_id"):
            hub.add_hub_file(item["repo_id"], item["file"], data)
        else:
            item["url"] = host.add_file(item["file"], data)
        entries.append(item)
    path = tmp_path_factory.mktemp("catalog") / "catalog.json"
    path.write_text(json.dumps({"models": entries}), encoding="utf-8")
    return path, sidecars


@pytest.fixture(scope="module")
def studio(hub, host, served, tmp_path_factory, plain_cpu):
    from engine.engine import Engine, EngineConfig
    from ui.handlers import Studio
    from ui.settings import SettingsStore

    root = tmp_path_factory.mktemp("catalog-studio")
    engine = Engine(EngineConfig(root / "models", root / "outputs", root / "data", catalog_path=served[0]), plain_cpu)
    engine.downloads.hub_endpoint, engine.downloads.verify = hub.url, str(host.ca_file)
    return Studio(engine, SettingsStore(root / "ui-settings.json"))


def download_from_the_page(studio, name: str) -> Path:
    from ui.downloads_tab import run_download

    results = [item for item in run_download(studio, DownloadJob(), name, link=False)]
    assert isinstance(results[-1], Path), results[-1]
    return results[-1]


def noise(size, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def restore_a_face(engine, entry):
    """A face restorer's or the detector's file, downloaded, restores a face (the other half of the
    pair written here when it is not downloaded yet: a detector in the folder searched last, so a
    downloaded one in models/GFPGAN is the one used once it is there)."""
    from engine.faces import DETECTOR_FOLDERS, RESTORERS

    if entry.kind == "face-detector":
        assert engine.faces.detector_file() == engine.library.models_dir / entry.folder / entry.file
    if engine.faces.detector_file() is None:
        write_yunet_onnx(engine.library.models_dir / DETECTOR_FOLDERS[-1] / "face_detection_yunet_fixture.onnx")
    if not engine.face_restorer_names():
        write_gfpgan(engine.library.models_dir / RESTORERS["GFPGAN"][0] / "GFPGANv1.4.pth", half=True)
    restorer = {"gfpgan": "GFPGAN", "codeformer": "CodeFormer"}.get(entry.family, "GFPGAN")
    image = noise((256, 192))
    draw_face(image, (40, 30, 124, 126))
    restored = engine.faces.restore(image, engine.faces.resolve(restorer))
    assert restored.faces == 1
    return type("Result", (), {"images": [restored.image]})()


@pytest.mark.parametrize("name", [e["name"] for e in BUNDLED])
def test_a_catalogue_entry_downloads_and_then_works(studio, served, name):
    engine = studio.engine
    entry = engine.downloads.catalog.get(name)
    path = download_from_the_page(studio, name)
    assert path == engine.library.models_dir / entry.folder / entry.file and path.is_file()
    if served[1][name] is not None:
        write_yaml(served[1][name], path.with_suffix(".yaml"))
    engine.refresh_models()
    if entry.family == "sd-x4-upscaler":
        result = engine.upscale(noise((32, 32)), f"SD x4: {entry.file}", 4, save=False, prompt="a red barn",
                                steps=2, seed=1)
        assert result.images[0].size == (128, 128)
    elif entry.kind in ("face-restorer", "face-detector"):
        result = restore_a_face(engine, entry)
    elif entry.kind == "upscaler":
        result = engine.upscale(noise((32, 24)), Path(entry.file).stem, 4, save=False)
        assert result.images[0].size == (128, 96)
    else:
        status = {s.name: s for s in engine.refresh_models()}[entry.file]
        assert status.error is None and status.family, status
        engine.load_model(entry.file)
        result = engine.generate(engine.make_request(SMALL))
        assert result.images[0].size == (64, 64)
    assert np.asarray(result.images[0]).std() > 1  # the model ran: not a blank image
