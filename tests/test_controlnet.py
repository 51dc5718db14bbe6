"""ControlNet units (engine/networks/controlnet.py): files in the layouts people download, built
tiny here from the tiny SD 1.x UNet (a ControlNet is its base's encoder half); a unit guides the
picture through residuals, exactly the ones diffusers' ControlNetModel gives; weight 0, a disabled
unit and a guidance window that holds no step leave the plain picture's pixels."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from engine.errors import RequestError
from tests.conftest import loaded_engine
from tests.ldm_export import controlnet_to_ldm
from tests.tiny_models import models_linking_tiny_sd1

BASE = {"prompt": "a house", "steps": 3, "width": 64, "height": 64, "seed": 7, "cfg_scale": 5.0}


def tiny_controlnet(unet, seed: int, **config):
    """A ControlNet of `unet`'s shape with random weights everywhere: diffusers starts the residual
    convs at zero, which would make every unit a no-op."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(unet, load_weights_from_unet=False, **config)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")):
                p.normal_(0, 0.3)
    return net.eval()


def sdxl_shaped_controlnet(unet, seed: int):
    """Shaped like an SDXL ControlNet: size conditioning (add_embedding), as no SD 1.x one has."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    config.update(addition_embed_type="text_time", addition_time_embed_dim=8,
                  projection_class_embeddings_input_dim=8 * 6 + unet.config.cross_attention_dim)
    net = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
    keep = set(net.config) & set(config)
    return ControlNetModel.from_config({k: config[k] for k in keep}).eval()


def house(size: int = 96) -> Image.Image:
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((size // 4, size // 3, 3 * size // 4, size - 8), outline="black", width=3)
    draw.polygon([(size // 4, size // 3), (size // 2, 8), (3 * size // 4, size // 3)], outline="black")
    return image


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def source(tiny_models_dir, tmp_path_factory, plain_cpu):
    """The tiny ControlNet the files below hold (diffusers' model, the reference)."""
    root = tmp_path_factory.mktemp("cn-probe")
    pipe = loaded_engine(tiny_models_dir, root, plain_cpu).manager.current.pipe
    return tiny_controlnet(pipe.unet, 1), sdxl_shaped_controlnet(pipe.unet, 2)


@pytest.fixture(scope="module")
def models(tiny_models_dir, tmp_path_factory, source):
    root = tmp_path_factory.mktemp("cn-models")
    models = models_linking_tiny_sd1(root, tiny_models_dir)
    folder = models / "ControlNet"
    folder.mkdir()
    net, sdxl = source
    save_file(controlnet_to_ldm(net), str(folder / "control_v11p_sd15_canny.safetensors"))
    torch.save(controlnet_to_ldm(net, prefix=""), folder / "control_sd15_canny_plain.pth")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "diffusers_canny.safetensors"))
    net.save_pretrained(folder / "canny-diffusers-folder")
    save_file(controlnet_to_ldm(sdxl), str(folder / "controlnet_sdxl_canny.safetensors"))
    return models


@pytest.fixture(scope="module")
def engine(models, tmp_path_factory, plain_cpu):
    return loaded_engine(models, tmp_path_factory.mktemp("cn-engine"), plain_cpu)


def unit(**fields):
    return {"enabled": True, "image": png(house()), "module": "none", "model": "control_v11p_sd15_canny", **fields}


def generate(engine, units=(), **fields):
    request = engine.make_request({**BASE, **fields, "controlnet": list(units)})
    return engine.generate(request)


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0].convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def plain(engine):
    return pixels(generate(engine))


LAYOUTS = ["control_v11p_sd15_canny", "control_sd15_canny_plain", "diffusers_canny", "canny-diffusers-folder"]


@pytest.mark.parametrize("name", LAYOUTS)
def test_a_controlnet_file_loads_with_the_weights_it_holds(engine, source, name):
    cns = engine.controlnets
    loaded = cns.load(cns.resolve(name), engine.manager.current.pipe.unet)
    want = source[0].state_dict()
    got = loaded.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_the_list_names_each_file_with_its_legacy_hash(engine):
    titles = engine.controlnet_names()
    assert len(titles) == 5
    for title in titles:
        name, hash8 = title[:-1].split(" [")
        assert len(hash8) == 8 and int(hash8, 16) >= 0
    assert any(t.startswith("control_v11p_sd15_canny [") for t in titles)


def test_an_a1111_trees_extension_folder_is_listed_too(tmp_path, source):
    from engine.networks.controlnet import ControlNets

    models = tmp_path / "webui" / "models"
    ext = tmp_path / "webui" / "extensions" / "sd-webui-controlnet" / "models"
    ext.mkdir(parents=True)
    save_file(controlnet_to_ldm(source[0]), str(ext / "control_v11f1p_sd15_depth.safetensors"))
    assert [t.split(" [")[0] for t in ControlNets(models).titles()] == ["control_v11f1p_sd15_depth"]


def test_a_controlnet_of_another_family_is_refused_naming_both(engine):
    with pytest.raises(RequestError) as refused:
        generate(engine, [unit(model="controlnet_sdxl_canny")])
    message = str(refused.value)
    assert message.startswith("controlnet[0].model:") and "SDXL ControlNet" in message and "the model is" in message


def test_a_name_outside_the_folder_is_refused_at_the_edge(engine):
    with pytest.raises(RequestError, match=r"^controlnet\[0\]\.model: '\.\./Stable-diffusion/tiny-sd1' is not in"):
        engine.make_request({**BASE, "controlnet": [unit(model="../Stable-diffusion/tiny-sd1")]})


def test_a_unit_guides_the_picture(engine, plain):
    guided = pixels(generate(engine, [unit()]))
    assert np.abs(guided - plain).mean() > 1.0


@pytest.mark.parametrize("off", [{"weight": 0}, {"enabled": False}, {"guidance_start": 1.0}])
def test_a_unit_that_adds_nothing_gives_the_plain_pixels(engine, plain, off):
    assert np.array_equal(pixels(generate(engine, [unit(**off)])), plain)


def test_each_unet_call_gets_the_controlnets_own_residuals(engine, source):
    """The hook's call equals the UNet called with diffusers' ControlNetModel residuals, by hand."""
    from engine.networks.controlnet import ActiveUnit, AddControl
    from engine.networks.control_units import units_from
    from diffusers.hooks import HookRegistry

    pipe = engine.manager.current.pipe
    unet, net = pipe.unet, source[0]
    the_unit = units_from([unit(weight=0.7)])[0]

    class Pass:  # what the hook reads of the generator's Run
        scheduler = pipe.scheduler
        def cfg_halves(self, rows):
            return False

    pipe.scheduler.set_timesteps(4)
    torch.manual_seed(0)
    sample = torch.randn(1, 4, 8, 8)
    text = torch.randn(1, 77, unet.config.cross_attention_dim)
    t = pipe.scheduler.timesteps[1]
    hint = torch.from_numpy(np.asarray(the_unit.image.resize((64, 64), Image.LANCZOS), dtype=np.float32) / 255)
    hint = hint.permute(2, 0, 1)[None]
    with torch.no_grad():
        down, mid = net(sample, t, encoder_hidden_states=text, controlnet_cond=hint, conditioning_scale=0.7,
                        return_dict=False)
        want = unet(sample, t, encoder_hidden_states=text, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid).sample
        active = ActiveUnit(the_unit, "t", net, the_unit.image)
        active._hints[((8, 8), 1, "cpu", torch.float32)] = hint  # the same map as above, fitted by hand
        registry = HookRegistry.check_if_exists_or_initialize(unet)
        registry.register_hook(AddControl([active], Pass()), "probe")
        try:
            got = unet(sample, t, encoder_hidden_states=text).sample
        finally:
            registry.remove_hook("probe", recurse=False)
        plain = unet(sample, t, encoder_hidden_states=text).sample
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-3)


def test_the_infotext_records_the_unit_as_the_extension_writes_it(engine):
    result = generate(engine, [unit(module="canny", threshold_a=50)])
    title = next(t for t in engine.controlnet_names() if t.startswith("control_v11p_sd15_canny ["))
    assert (f'ControlNet 0: "Module: canny, Model: {title}, Weight: 1.0, Resize Mode: Crop and Resize, '
            'Processor Res: 512, Threshold A: 50.0, Threshold B: 200, Guidance Start: 0.0, Guidance End: 1.0, '
            'Pixel Perfect: False, Control Mode: Balanced"') in result.infotexts[0]


def test_png_info_reads_the_unit_back(engine):
    from engine.networks.control_units import parse_infotext

    result = generate(engine, [unit(weight=0.5, control_mode="My prompt is more important")])
    fields = engine.png_info(result.paths[0]).fields  # the saved PNG, as PNG info reads it
    back = parse_infotext(fields["ControlNet 0"])
    assert back["Module"] == "none" and back["Weight"] == "0.5" and back["Control Mode"] == "My prompt is more important"
    assert back["Model"].startswith("control_v11p_sd15_canny [")


def test_the_control_modes_give_different_pictures(engine):
    balanced, prompt, control = (pixels(generate(engine, [unit(control_mode=m)])) for m in range(3))
    assert np.abs(balanced - prompt).mean() > 0.5 and np.abs(balanced - control).mean() > 0.5


def test_two_units_add_up(engine):
    one = pixels(generate(engine, [unit()]))
    two = pixels(generate(engine, [unit(), unit(model="canny-diffusers-folder", weight=0.5)]))
    assert np.abs(one - two).mean() > 0.5


def test_a_unit_works_in_img2img_and_hires_fix(engine, plain):
    init = png(Image.new("RGB", (64, 64), (120, 90, 60)))
    img2img = generate(engine, [unit()], mode="img2img", init_image=init, denoising_strength=0.6)
    hires = generate(engine, [unit()], enable_hr=True, hr_scale=1.5, hr_second_pass_steps=2,
                     denoising_strength=0.5)
    assert img2img.images[0].size == (64, 64) and hires.images[0].size == (96, 96)
    assert "ControlNet 0" in hires.infotexts[0]


def test_the_generator_takes_the_hooks_off_after_the_job(engine, plain):
    generate(engine, [unit()])
    assert np.array_equal(pixels(generate(engine)), plain)


# --- the command line -------------------------------------------------------------------------

def cli(capsys, models, tmp_path, *extra):
    import app

    code = app.main(["txt2img", "--models-dir", str(models), "--outdir", str(tmp_path / "out"), "--data-dir",
                     str(tmp_path / "data"), "--prompt", "a house", "--steps", "2", "--width", "64", "--height", "64",
                     "--seed", "3", *extra])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_cli_makes_a_guided_picture_with_its_infotext(capsys, models, tmp_path):
    house().save(tmp_path / "house.png")
    code, out, err = cli(capsys, models, tmp_path, "--controlnet", "control_v11p_sd15_canny", "--control-image",
                         str(tmp_path / "house.png"), "--control-module", "canny", "--control-weight", "0.8")
    assert code == 0, err
    guided = Image.open(out.split()[0])
    assert 'ControlNet 0: "Module: canny, Model: control_v11p_sd15_canny [' in guided.info["parameters"]
    assert "Weight: 0.8," in guided.info["parameters"]
    code, out, err = cli(capsys, models, tmp_path)
    plain = np.asarray(Image.open(out.split()[0]).convert("RGB"), dtype=np.int16)
    assert np.abs(np.asarray(guided.convert("RGB"), dtype=np.int16) - plain).mean() > 1.0


def test_the_cli_refuses_a_control_option_without_its_controlnet(capsys, models, tmp_path):
    code, out, err = cli(capsys, models, tmp_path, "--control-weight", "0.5")
    assert code == 2 and "--control-weight: give --controlnet MODEL before it" in err


def test_the_cli_names_a_bad_unit_field(capsys, models, tmp_path):
    house().save(tmp_path / "house.png")
    code, out, err = cli(capsys, models, tmp_path, "--controlnet", "control_v11p_sd15_canny", "--control-image",
                         str(tmp_path / "house.png"), "--control-weight", "9")
    assert code == 2 and err.strip().splitlines() == ["error: controlnet[0].weight: must be between 0 and 2, got '9'"]
