"""ControlNet units on the other families' UNets (torch): SDXL (its size conditioning goes to the
ControlNet too; nine skip residuals instead of twelve's shape) and SD 1.x inpainting (a 9-channel
UNet whose ControlNet reads the 4 latent channels). A ControlNet of the wrong family is refused."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from engine.errors import RequestError
from tests.conftest import loaded_engine
from tests.ldm_export import controlnet_to_ldm
from tests.test_controlnet import house, png, tiny_controlnet
from tests.tiny_models import save_folder, tiny_pipeline

BASE = {"prompt": "a house", "steps": 2, "width": 64, "height": 64, "seed": 5, "cfg_scale": 4.0, "save_images": False}


def family_engine(family: str, root, hardware, *, controlnets: dict):
    """An engine whose only checkpoint is a tiny `family` model, with ControlNets made from
    `controlnets` {file name: (family whose UNet it copies, layout)}."""
    models = root / "models"
    pipes = {}
    for name, (of, _) in controlnets.items():
        pipes.setdefault(of, tiny_pipeline(of))
    pipe = pipes.get(family) or tiny_pipeline(family)
    save_folder(pipe, models / "Stable-diffusion" / f"tiny-{family}")
    (models / "ControlNet").mkdir(parents=True)
    for name, (of, layout) in controlnets.items():
        net = tiny_controlnet(pipes[of].unet, 3)
        state = controlnet_to_ldm(net) if layout == "original" else {k: v.contiguous() for k, v in net.state_dict().items()}
        save_file(state, str(models / "ControlNet" / f"{name}.safetensors"))
    from engine.engine import Engine, EngineConfig

    engine = Engine(EngineConfig(models, root / "outputs", root / "data"), hardware)
    engine.load_model(f"tiny-{family}")
    return engine


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0].convert("RGB"), dtype=np.int16)


def unit(model: str, **fields):
    return {"image": png(house()), "module": "canny", "model": model, **fields}


def run(engine, units=(), **fields):
    return engine.generate(engine.make_request({**BASE, **fields, "controlnet": list(units)}))


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory, plain_cpu):
    return family_engine("sdxl", tmp_path_factory.mktemp("cn-sdxl"), plain_cpu,
                         controlnets={"diffusers_xl_canny": ("sdxl", "diffusers"), "control_sd15_canny": ("sd1", "original")})


def test_an_sdxl_unit_guides_the_picture_and_weight_0_is_plain(sdxl):
    plain = pixels(run(sdxl))
    assert np.abs(pixels(run(sdxl, [unit("diffusers_xl_canny")])) - plain).mean() > 0.5
    assert np.array_equal(pixels(run(sdxl, [unit("diffusers_xl_canny", weight=0)])), plain)


def test_an_sd15_controlnet_on_sdxl_is_refused_naming_both(sdxl):
    with pytest.raises(RequestError, match=r"^controlnet\[0\]\.model: control_sd15_canny is a .* ControlNet; "
                                           r"the model is SDXL"):
        run(sdxl, [unit("control_sd15_canny")])


def test_an_inpainting_model_takes_a_unit_in_img2img_with_a_mask(tmp_path, plain_cpu):
    from PIL import Image

    engine = family_engine("sd1-inpaint", tmp_path, plain_cpu, controlnets={"control_sd15_canny": ("sd1", "original")})
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    fields = dict(mode="img2img", init_image=png(Image.new("RGB", (64, 64), (90, 120, 160))), mask=png(mask),
                  denoising_strength=0.9)
    plain = pixels(run(engine, **fields))
    guided = pixels(run(engine, [unit("control_sd15_canny")], **fields))
    assert np.abs(guided - plain).mean() > 0.1
    assert np.array_equal(guided[:8, :8], plain[:8, :8])  # outside the mask the init image stays
