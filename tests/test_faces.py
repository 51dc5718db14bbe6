"""Restore faces (engine/faces.py): OpenCV's YuNet finds each face, GFPGAN or CodeFormer redraws it,
and it is blended back; in a job, the infotext's "Face restoration", PNG info, the CLI and the
refusals when a model or the detector is missing.

The files are built here in the layout their releases ship (tests/face_fixtures.py): a YuNet-layout
ONNX detector that finds the faces `draw_face` paints, GFPGAN v1.4's architecture with random
weights and a small CodeFormer, both wrapped in `params_ema` as GFPGANv1.4.pth and codeformer.pth are."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import app
from engine.errors import RequestError, UnknownCheckpointError
from engine.faces import FaceRestorers, detect_faces, load_restorer
from engine.infotext import parse_infotext, values_from_params
from engine.library import ModelLibrary
from tests.face_fixtures import draw_face, write_codeformer, write_gfpgan, write_yunet_onnx
from tests.tiny_models import models_linking_tiny_sd1

FACE = (40, 30, 124, 126)  # x0, y0, x1, y1 in a 256x192 picture


@pytest.fixture(scope="module")
def face_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("face-files")
    return {"detector": write_yunet_onnx(root / "face_detection_yunet_2023mar.onnx"),
            "gfpgan": write_gfpgan(root / "GFPGANv1.4.pth", half=True),
            "codeformer": write_codeformer(root / "codeformer-v0.1.0.pth", half=True)}


def face_folder(root: Path, tiny_models_dir: Path, files: dict[str, Path], *which: str) -> Path:
    """A models folder with the tiny SD 1.x model and the named face files (links), where A1111 keeps them."""
    models = models_linking_tiny_sd1(root, tiny_models_dir)
    places = {"detector": "GFPGAN", "gfpgan": "GFPGAN", "codeformer": "Codeformer"}
    for name in which:
        (models / places[name]).mkdir(parents=True, exist_ok=True)
        os.symlink(files[name], models / places[name] / files[name].name)
    return models


@pytest.fixture(scope="module")
def face_engine(tiny_models_dir, face_files, tmp_path_factory, plain_cpu):
    from engine.engine import Engine, EngineConfig

    root = tmp_path_factory.mktemp("face-engine")
    models = face_folder(root, tiny_models_dir, face_files, "detector", "gfpgan", "codeformer")
    engine = Engine(EngineConfig(models, root / "outputs", root / "data"), plain_cpu)
    engine.load_model("tiny-sd1")
    return engine


def picture_with_faces(*boxes, size=(256, 192), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 90, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    for box in boxes:
        draw_face(image, box)
    return image


def changed(before: Image.Image, after: Image.Image) -> np.ndarray:
    return np.any(np.asarray(before) != np.asarray(after), axis=-1)


def test_yunet_finds_the_drawn_face_with_the_eyes_in_picture_order(face_engine):
    detector = face_engine.faces._load_detector()
    (face,) = detect_faces(detector, picture_with_faces(FACE))
    x, y, w, h = face.box
    assert abs(x - FACE[0]) < 4 and abs(y - FACE[1]) < 4 and abs(w - 84) < 6 and abs(h - 96) < 6
    eyes, nose, mouth = face.landmarks[:2], face.landmarks[2], face.landmarks[3:]
    assert eyes[0, 0] < eyes[1, 0] and mouth[0, 0] < mouth[1, 0]  # image-left first, as the FFHQ template
    assert eyes[:, 1].max() < nose[1] < mouth[:, 1].min()


def test_a_restored_face_is_redrawn_and_pixels_away_from_it_are_exact(face_engine):
    before = picture_with_faces(FACE, size=(512, 384))
    restored = face_engine.faces.restore(before, "GFPGAN")
    assert restored.faces == 1 and restored.image.size == before.size
    moved = changed(before, restored.image)
    x0, y0, x1, y1 = FACE
    assert moved[y0 + 20:y1 - 20, x0 + 20:x1 - 20].mean() > 0.9  # the face itself is redrawn
    # The aligned crop is about twice the face's size around it: beyond that nothing moves.
    assert not moved[:, 300:].any() and not moved[300:, :].any()


def test_a_picture_without_faces_is_returned_unchanged(face_engine):
    before = picture_with_faces()
    restored = face_engine.faces.restore(before, "GFPGAN")
    assert restored.faces == 0 and not changed(before, restored.image).any()


def test_every_face_in_a_picture_is_redrawn(face_engine):
    before = picture_with_faces((30, 40, 150, 180), (300, 60, 440, 220), size=(512, 384))
    restored = face_engine.faces.restore(before, "GFPGAN")
    moved = changed(before, restored.image)
    assert restored.faces == 2 and moved[80:140, 60:120].mean() > 0.9 and moved[100:180, 340:400].mean() > 0.9


def test_codeformer_redraws_by_its_weight(face_engine):
    before = picture_with_faces(FACE)
    most = face_engine.faces.restore(before, "CodeFormer", 0.0).image
    closest = face_engine.faces.restore(before, "CodeFormer", 1.0).image
    assert changed(before, most)[50:100, 60:100].mean() > 0.9
    assert changed(most, closest)[50:100, 60:100].mean() > 0.5  # the weight reaches the network


def test_an_img2img_job_restores_faces_and_records_the_restorer(face_engine):
    init = picture_with_faces(FACE)
    request = face_engine.make_request({"mode": "img2img", "prompt": "a portrait", "init_image": init,
                                        "denoising_strength": 0, "restore_faces": True, "save_images": False})
    assert request.face_restorer == "GFPGAN"  # Automatic: the first on disk, named before the job runs
    result = face_engine.generate(request)
    assert changed(init, result.images[0])[50:100, 60:100].mean() > 0.9
    assert "restore faces: 1 face(s) redrawn by GFPGAN" in result.notes
    parsed = parse_infotext(result.infotexts[0])
    assert parsed["Face restoration"] == "GFPGAN"
    values = values_from_params(parsed)
    assert values["restore_faces"] is True and values["face_restorer"] == "GFPGAN"


def test_restore_faces_on_a_picture_without_faces_keeps_its_pixels(face_engine):
    """What is added to a job and finds nothing to do leaves the plain image's pixels exactly."""
    fields = {"prompt": "a field of wheat", "width": 64, "height": 64, "steps": 2, "seed": 5, "save_images": False}
    plain = face_engine.generate(face_engine.make_request(fields))
    restored = face_engine.generate(face_engine.make_request({**fields, "restore_faces": True}))
    assert np.array_equal(np.asarray(plain.images[0]), np.asarray(restored.images[0]))
    assert "restore faces: no face found in the pictures" in restored.notes
    assert "Face restoration: GFPGAN" in restored.infotexts[0] and "Face restoration" not in plain.infotexts[0]


def test_without_a_restorer_the_request_names_the_download(sd_engine):
    with pytest.raises(RequestError, match=r"restore_faces: no GFPGAN model in models/GFPGAN: download one "
                                           r"\(app.py download gfpgan-1.4"):
        sd_engine.make_request({"prompt": "a face", "restore_faces": True})


def test_without_the_detector_the_request_names_its_download(tiny_models_dir, face_files, tmp_path, plain_cpu):
    from engine.engine import Engine, EngineConfig

    models = face_folder(tmp_path, tiny_models_dir, face_files, "gfpgan")
    engine = Engine(EngineConfig(models, tmp_path / "outputs", tmp_path / "data"), plain_cpu)
    with pytest.raises(RequestError, match="restore_faces: .*face_detection_yunet_2023mar.onnx.*"
                                           "app.py download yunet-face-detector"):
        engine.make_request({"prompt": "a face", "restore_faces": True})


def test_a_restorer_not_on_disk_is_refused_by_name(tiny_models_dir, face_files, tmp_path):
    faces = FaceRestorers(ModelLibrary(face_folder(tmp_path, tiny_models_dir, face_files, "detector", "gfpgan")))
    assert faces.names() == ["GFPGAN"]
    with pytest.raises(RequestError, match=r"no CodeFormer model in models/Codeformer.*codeformer"):
        faces.resolve("CodeFormer")


def test_a_file_that_is_not_a_face_model_is_refused_naming_it(tmp_path):
    from tests.field_files import realesrgan_x4plus

    path = tmp_path / "GFPGANv9.pth"
    with open(path, "wb") as f:
        realesrgan_x4plus(f)
    with pytest.raises(UnknownCheckpointError, match="GFPGANv9.pth: is a .* model, not GFPGAN or CodeFormer"):
        load_restorer(path)


def test_the_cli_restores_faces(face_engine, tmp_path, capsys):
    init = tmp_path / "portrait.png"
    picture_with_faces(FACE).save(init)
    code = app.main(["img2img", "--models-dir", str(face_engine.library.models_dir), "--outdir", str(tmp_path / "out"),
                     "--data-dir", str(tmp_path / "data"), "--prompt", "a portrait", "--init-img", str(init),
                     "--strength", "0", "--restore-faces", "--face-restorer", "GFPGAN", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    (saved,) = (tmp_path / "out").rglob("*.png")
    with Image.open(saved) as image:
        assert "Face restoration: GFPGAN" in image.info["parameters"]
        assert changed(Image.open(init).convert("RGB"), image.convert("RGB"))[50:100, 60:100].mean() > 0.9


def test_the_api_restores_faces_with_the_restorer_its_options_name(face_engine, tmp_path):
    import base64
    import io
    import json

    import gradio as gr
    from starlette.testclient import TestClient

    from ui.server import build_app

    with gr.Blocks() as page:
        gr.Markdown("faces")
    api = build_app(page, logins=[], outdir=tmp_path / "outputs", max_upload_mb=4, engine=face_engine)
    buffer = io.BytesIO()
    picture_with_faces(FACE).save(buffer, format="PNG")
    body = {"prompt": "a portrait", "init_images": [base64.b64encode(buffer.getvalue()).decode()],
            "width": 256, "height": 192, "denoising_strength": 0, "restore_faces": True, "save_images": False,
            "override_settings": {"face_restoration_model": "CodeFormer", "code_former_weight": 0.2}}
    with TestClient(api, base_url="http://127.0.0.1:7860") as client:
        listed = client.get("/sdapi/v1/face-restorers").json()
        answer = client.post("/sdapi/v1/img2img", json=body)
    assert [row["name"] for row in listed] == ["GFPGAN", "CodeFormer"]
    assert answer.status_code == 200, answer.text
    info = json.loads(answer.json()["info"])
    assert info["restore_faces"] is True and info["face_restoration_model"] == "CodeFormer"
    assert "restore_faces" not in info["ignored"] and "Face restoration: CodeFormer" in info["infotexts"][0]
    with Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0]))) as image:
        assert changed(picture_with_faces(FACE), image.convert("RGB"))[50:100, 60:100].mean() > 0.9
