"""Each family, loaded from an original-layout single file with its sidecar yaml, generates through
the whole engine: txt2img and img2img (the upscaler is refused with a clear message)."""
import numpy as np
import pytest
from PIL import Image

from engine.engine import Engine, EngineConfig
from engine.errors import EaselError
from engine.families import Family
from ldm_export import export_single_file
from tiny_models import tiny_pipeline

FAMILIES_THAT_GENERATE = [Family.SD1, Family.SD2_V, Family.SDXL, Family.SD1_INPAINT]


@pytest.fixture(scope="module")
def family_engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    sd = root / "models" / "Stable-diffusion"
    sd.mkdir(parents=True)
    for family in [*FAMILIES_THAT_GENERATE, Family.SD_X4_UPSCALER]:
        export_single_file(tiny_pipeline(family), family, sd / f"tiny-{family.value}.safetensors")
    return Engine(EngineConfig(root / "models", root / "outputs", root / "data", watermark=False))


def test_models_listing_names_every_family(family_engine):
    labels = {s.name: s.family for s in family_engine.models()}
    assert labels["tiny-sdxl.safetensors"] == "SDXL base"
    assert labels["tiny-sd2-v.safetensors"] == "SD 2.x (768, v-prediction)"
    assert labels["tiny-sd1-inpaint.safetensors"] == "SD 1.x inpainting"
    assert labels["tiny-sd-x4-upscaler.safetensors"] == "SD x4 upscaler"


@pytest.mark.parametrize("family", FAMILIES_THAT_GENERATE, ids=lambda f: f.value)
def test_txt2img_and_img2img_from_single_file(family_engine, family):
    name = f"tiny-{family.value}.safetensors"
    common = {"prompt": "a (blue:1.2) house", "negative_prompt": "fog", "steps": 2, "seed": 3, "save_images": False}
    txt = family_engine.generate(family_engine.make_request({**common, "width": 64, "height": 64}, model=name), model=name)
    image = txt.images[0]
    assert image.size == (64, 64)
    assert np.asarray(image).std() > 0  # not a blank image
    init = Image.new("RGB", (64, 64), (40, 120, 200))
    req = family_engine.make_request({**common, "mode": "img2img", "init_image": init, "denoising_strength": 0.5}, model=name)
    assert family_engine.generate(req, model=name).images[0].size == (64, 64)
    assert f"Model: tiny-{family.value}," in txt.infotexts[0]


def test_upscaler_checkpoint_cannot_generate(family_engine):
    with pytest.raises(EaselError, match="x4 upscaler"):
        family_engine.load_model("tiny-sd-x4-upscaler.safetensors")
