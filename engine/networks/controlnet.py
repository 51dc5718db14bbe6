"""ControlNet: a copy of the UNet's encoder half that reads a control map (an edge map, a pose,
a depth map) and adds residuals to the UNet's skip connections and middle block.

Files come from models/ControlNet/ (A1111's folder) and, when the models folder is an A1111 tree's,
its extensions/sd-webui-controlnet/models: lllyasviel's original layout (`.pth` or `.safetensors`,
keys with or without the `control_model.` prefix), diffusers' layout as a single file, or a
diffusers folder (config.json beside its weights). Every file is read by engine.safe_files (no
pickle code runs), converted by diffusers' own single-file converter, and configured from the
loaded model's UNet: a ControlNet is its base model's encoder half, so the base's config is the
ControlNet's, with only the hint encoder's widths read from the file. One whose family is not the
model's (an SDXL ControlNet on SD 1.5) is refused, naming both.

During a job the ControlNet runs as a diffusers hook on the UNet (`_AddControl`), so it applies
to every pass the job makes (txt2img, img2img, inpainting, hires fix) at that pass's latent size.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import torch
from diffusers.hooks import ModelHook  # engine.openvino_backend has it imported already
from PIL import Image

from engine.errors import RequestError
from engine.library import CHECKPOINT_SUFFIXES, ModelEntry
from engine.networks import JobPart
from engine.networks.control_units import ControlUnit
from engine.networks.preprocessors import preprocess

logger = logging.getLogger(__name__)

FOLDER = "ControlNet"
A1111_EXTENSION_FOLDER = "extensions/sd-webui-controlnet/models"  # beside an A1111 tree's models/
HOOK_NAME = "easel_controlnet"
LDM_PREFIX = "control_model."
# Soft injection (sd-webui-controlnet's "My prompt is more important" and "ControlNet is more
# important"): the residual of depth i of n is scaled by this ** (n - 1 - i), the deepest by 1.
SOFT_INJECTION_BASE = 0.825


def legacy_hash(path: Path) -> str:
    """sd-webui-controlnet's `name [hash]`: A1111's legacy model hash, the sha256 of the 64 KiB at
    1 MiB into the file, 8 hex digits (a diffusers folder: of its weights file)."""
    path = Path(path)
    if path.is_dir():
        path = _folder_weights(path)
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def _folder_weights(folder: Path) -> Path:
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    raise RequestError("controlnet", f"{folder.name}: a ControlNet folder without diffusion_pytorch_model weights")


@dataclass(frozen=True)
class ControlNetFile:
    name: str    # the file's stem (a folder's name): what sd-webui-controlnet lists
    entry: ModelEntry
    hash: str

    @property
    def title(self) -> str:
        return f"{self.name} [{self.hash}]"


def _is_controlnet_folder(path: Path) -> bool:
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and str(config.get("_class_name", "")).startswith("ControlNet")


class ControlNets:
    """The ControlNet files of a models folder, and the one loaded model of each, kept while used."""

    def __init__(self, models_dir: Path):
        self.models_dir = Path(models_dir)
        self._hashes: dict[tuple, str] = {}
        self._loaded: dict[tuple, torch.nn.Module] = {}  # (file key, dtype, device) -> ControlNetModel

    def folders(self) -> list[Path]:
        return [self.models_dir / FOLDER, self.models_dir.parent / A1111_EXTENSION_FOLDER]

    def files(self) -> list[ControlNetFile]:
        found = []
        for root in self.folders():
            if not root.is_dir():
                continue
            for path in sorted(root.rglob("*"), key=lambda p: str(p).lower()):
                if any(part.startswith(".") for part in path.relative_to(root).parts):
                    continue
                is_folder = path.is_dir() and _is_controlnet_folder(path)
                if is_folder or (path.is_file() and path.suffix.lower() in CHECKPOINT_SUFFIXES
                                 and not any(_is_controlnet_folder(p) for p in path.parents if root in p.parents)):
                    entry = ModelEntry(path.relative_to(root).as_posix(), path, is_folder)
                    found.append(ControlNetFile(_stem(entry), entry, self._hash(path)))
        return found

    def _hash(self, path: Path) -> str:
        stat = (path / "config.json").stat() if path.is_dir() else path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key not in self._hashes:
            self._hashes[key] = legacy_hash(path)
        return self._hashes[key]

    def titles(self) -> list[str]:
        return [f.title for f in self.files()]

    def resolve(self, name: str, field_name: str = "controlnet") -> ControlNetFile:
        """A ControlNet by its title ("name [hash]"), its stem or its path inside the folder, looked
        up among the listed files only (never joined onto a path)."""
        wanted = name.strip()
        files = self.files()
        for match in (lambda f: f.title == wanted, lambda f: f.name == wanted,
                      lambda f: wanted in (f.entry.name, f.entry.name.rsplit(".", 1)[0]),
                      lambda f: wanted.endswith("]") and " [" in wanted and f.name == wanted[:wanted.rindex(" [")]):
            hits = [f for f in files if match(f)]
            if hits:
                return hits[0]
        known = ", ".join(f.title for f in files) or "none"
        raise RequestError(field_name, f"{wanted!r} is not in {self.models_dir / FOLDER}; available: {known}")

    def load(self, file: ControlNetFile, unet, field_name: str = "controlnet") -> torch.nn.Module:
        """The ControlNet of `file` for the UNet `unet` (its dtype and device), loaded once."""
        stat = file.entry.path.stat()
        key = (str(file.entry.path), stat.st_mtime_ns, unet.dtype, str(unet.device))
        if key not in self._loaded:
            self._loaded.clear()  # one set at a time: a ControlNet of SD 1.5 is 1.4 GB in f32
            self._loaded[key] = load_controlnet(file, unet, field_name)
        return self._loaded[key]

    def forget(self, model) -> None:
        """Drop a loaded ControlNet (OpenVINO runs its compiled copy)."""
        for key in [k for k, v in self._loaded.items() if v is model]:
            del self._loaded[key]

    def keep_only(self, wanted: set) -> None:
        for key in list(self._loaded):
            if key[0] not in wanted:
                del self._loaded[key]


def _stem(entry: ModelEntry) -> str:
    base = PurePosixPath(entry.name).name
    return base if entry.is_folder else base.rsplit(".", 1)[0]


# --- loading --------------------------------------------------------------------------------

def _family_of(width: int, sdxl: bool) -> str:
    if sdxl:
        return "SDXL"
    return {768: "SD 1.x", 1024: "SD 2.x"}.get(width, f"{width}-wide (text states)")


def _controlnet_shape(state: dict) -> tuple[int | None, bool]:
    """(the width of the text states it attends to, whether it has SDXL's size conditioning)."""
    width = next((v.shape[-1] for k, v in state.items() if k.endswith("attn2.to_k.weight")), None)
    sdxl = any(k.startswith(("label_emb.", "add_embedding.")) for k in state)
    return width, sdxl


def _unet_shape(unet) -> tuple[int, bool]:
    return int(unet.config.cross_attention_dim), unet.config.addition_embed_type == "text_time"


def check_family(state: dict, unet, name: str, field_name: str) -> None:
    width, sdxl = _controlnet_shape(state)
    base_width, base_sdxl = _unet_shape(unet)
    if (width is not None and width != base_width) or sdxl != base_sdxl:
        raise RequestError(field_name, f"{name} is a {_family_of(width or 0, sdxl)} ControlNet; the model is "
                                       f"{_family_of(base_width, base_sdxl)}")


def _hint_channels(state: dict, original: bool, name: str, field_name: str) -> tuple[int, tuple[int, ...]]:
    """(conditioning channels, the hint encoder's widths) read from its convolutions."""
    if original:
        convs = sorted((int(k.split(".")[1]), v) for k, v in state.items()
                       if k.startswith("input_hint_block.") and k.endswith(".weight"))
        shapes = [v.shape for _, v in convs]
        if not shapes:
            raise RequestError(field_name, f"{name}: no input_hint_block weights; not a ControlNet")
        # input_hint_block: conv 3->16, then (conv, conv stride 2) pairs, then the zero conv out
        widths = [shapes[0][0]] + [s[0] for s in shapes[2:-1:2]]
        return int(shapes[0][1]), tuple(int(w) for w in widths)
    conv_in = state["controlnet_cond_embedding.conv_in.weight"]
    blocks = sorted((int(k.split(".")[2]), v) for k, v in state.items()
                    if k.startswith("controlnet_cond_embedding.blocks.") and k.endswith(".weight"))
    widths = [conv_in.shape[0]] + [v.shape[0] for i, v in blocks if i % 2 == 1]
    return int(conv_in.shape[1]), tuple(int(w) for w in widths)


def load_controlnet(file: ControlNetFile, unet, field_name: str = "controlnet"):
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    from engine.checkpoints import _adopt, _empty, read_state_dict

    path = file.entry.path
    if file.entry.is_folder:
        model = ControlNetModel.from_pretrained(path, torch_dtype=unet.dtype, local_files_only=True)
        check_family(dict(model.state_dict()), unet, file.name, field_name)
        return model.to(unet.device).eval()
    state = read_state_dict(path)
    if any(k.startswith(LDM_PREFIX) for k in state):
        state = {k[len(LDM_PREFIX):]: v for k, v in state.items() if k.startswith(LDM_PREFIX)}
    original = "input_hint_block.0.weight" in state
    if not original and "controlnet_cond_embedding.conv_in.weight" not in state:
        raise RequestError(field_name, f"{file.name}: neither an original nor a diffusers ControlNet "
                                       "(no input_hint_block or controlnet_cond_embedding weights)")
    check_family(state, unet, file.name, field_name)
    channels, widths = _hint_channels(state, original, file.name, field_name)
    base = dict(unet.config)  # the fields diffusers' ControlNetModel.from_unet copies
    keep = ("in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "only_cross_attention",
            "block_out_channels", "layers_per_block", "downsample_padding", "mid_block_scale_factor", "act_fn",
            "norm_num_groups", "norm_eps", "cross_attention_dim", "transformer_layers_per_block",
            "encoder_hid_dim", "encoder_hid_dim_type", "attention_head_dim", "num_attention_heads",
            "use_linear_projection", "class_embed_type", "addition_embed_type", "addition_time_embed_dim",
            "num_class_embeds", "upcast_attention", "resnet_time_scale_shift",
            "projection_class_embeddings_input_dim", "mid_block_type")
    config = {k: base[k] for k in keep if k in base}
    config["in_channels"] = 4  # an inpainting UNet's 9 channels are not the ControlNet's: it reads the latents
    config.update(conditioning_channels=channels, conditioning_embedding_out_channels=widths)
    weights = convert_controlnet_checkpoint(state, config) if original else state
    weights = {k: v for k, v in weights.items() if v is not None}
    model = _adopt(_empty(lambda: ControlNetModel.from_config(config)), weights, unet.dtype, "ControlNet", path)
    return model.to(unet.device)


# --- a job's units --------------------------------------------------------------------------

def hint_factor(controlnet) -> int:
    """Pixels of control map per latent pixel: the hint encoder halves the size at each width step."""
    return 2 ** (len(controlnet.config.conditioning_embedding_out_channels) - 1)


def fit_map(image: Image.Image, size: tuple[int, int], mode: str) -> Image.Image:
    """The control map at `size` by the unit's resize mode (as the generator resizes an init image)."""
    from engine.generator import resize_init_image

    return resize_init_image(image, size[0], size[1], mode.lower())


@dataclass
class ActiveUnit:
    unit: ControlUnit
    title: str
    controlnet: torch.nn.Module
    detected: Image.Image  # the preprocessed map, before it is fitted to a pass's size
    file_hash: str = ""    # what names its converted OpenVINO graph in the cache
    factor: int = 8        # pixels of control map per latent pixel (hint_factor)
    _hints: dict = field(default_factory=dict)

    def hint(self, latent_hw: tuple[int, int], batch: int, device, dtype) -> torch.Tensor:
        """The map as the ControlNet's input for a latent of `latent_hw`: RGB in [0, 1], NCHW."""
        key = (latent_hw, batch, str(device), dtype)
        if key not in self._hints:
            import numpy as np

            f = self.factor
            fitted = fit_map(self.detected, (latent_hw[1] * f, latent_hw[0] * f), self.unit.resize_mode)
            pixels = torch.from_numpy(np.asarray(fitted.convert("RGB"), dtype=np.float32) / 255.0)
            tensor = pixels.permute(2, 0, 1).unsqueeze(0).repeat(batch, 1, 1, 1)
            self._hints.clear()
            self._hints[key] = tensor.to(device=device, dtype=dtype)
        return self._hints[key]


def pass_progress(scheduler, timestep) -> float:
    """How far the running pass is, 0 at its first step: the timestep's place among the steps the
    pass runs (diffusers' img2img starts at `begin_index`; second-order samplers repeat timesteps,
    the first place counts)."""
    steps = getattr(scheduler, "timesteps", None)
    if steps is None or len(steps) == 0:
        return 0.0
    t = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)
    begin = getattr(scheduler, "begin_index", None) or 0
    places = (steps[begin:].float() - t).abs()
    return float(torch.argmin(places)) / max(1, len(steps) - begin)


class AddControl(ModelHook):
    """On the UNet for one job: each call first runs the job's ControlNets on the same latents,
    timestep and text states, and passes their summed residuals to the UNet."""

    def __init__(self, units: list[ActiveUnit], run, ov=None):
        super().__init__()
        self.units = units
        self.run = run  # engine.generator.Run: its scheduler and request (CFG, images per pass)
        self.ov = ov    # controlnet_openvino.OpenVINOControl, or None: torch runs the call

    def new_forward(self, module, *args, **kwargs):
        given = inspect.signature(self.fn_ref.original_forward).bind(*args, **kwargs).arguments
        sample, timestep = given["sample"], given["timestep"]
        progress = pass_progress(self.run.scheduler, timestep)
        if self.ov is not None:
            return self._on_openvino(module, given, progress)
        down, mid = None, None
        for active in self.units:
            unit = active.unit
            if not unit.guidance_start <= progress <= unit.guidance_end:
                continue
            d, m = self._residuals(active, sample, timestep, given)
            down = d if down is None else [a + b for a, b in zip(down, d)]
            mid = m if mid is None else mid + m
        if down is not None:
            kwargs = {**given, "down_block_additional_residuals": tuple(down),
                      "mid_block_additional_residual": mid}
            return self.fn_ref.original_forward(**kwargs)
        return self.fn_ref.original_forward(*args, **kwargs)

    def _on_openvino(self, module, given, progress):
        """The whole call on OpenVINO: each unit's ControlNet graph, then the UNet graph with
        their summed residuals (zeros where no unit's window holds this step)."""
        import numpy as np

        from engine.openvino_backend import residual_shapes

        sample, timestep = given["sample"], given["timestep"]
        inputs = {**given, **(given.get("added_cond_kwargs") or {})}
        down, mid = None, None
        for index, active in enumerate(self.units):
            unit = active.unit
            if not unit.guidance_start <= progress <= unit.guidance_end:
                continue
            latents = sample[:, :4]
            hint = active.hint(tuple(latents.shape[-2:]), latents.shape[0], "cpu", torch.float32)
            outs = self.ov.residuals(index, latents, timestep, inputs, hint)
            outs = [o * s for o, s in zip(outs, self._scales(unit, len(outs)))]
            if unit.control_mode == "ControlNet is more important" and self.run.cfg_halves(sample.shape[0]):
                for o in outs:
                    o[: sample.shape[0] // 2] = 0
            down = outs[:-1] if down is None else [a + b for a, b in zip(down, outs[:-1])]
            mid = outs[-1] if mid is None else mid + outs[-1]
        if down is None:
            shapes = residual_shapes(module.config, tuple(sample.shape))
            zeros = [np.zeros(shape, dtype=np.float32) for shape in shapes]
            down, mid = zeros[:-1], zeros[-1]
        out = self.ov.noise(inputs, down, mid).to(dtype=sample.dtype, device=sample.device)
        self.run.backends.add(self.ov.unet.label)
        if given.get("return_dict", True):
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

            return UNet2DConditionOutput(sample=out)
        return (out,)

    @staticmethod
    def _scales(unit, n: int) -> list[float]:
        soft = unit.control_mode != "Balanced"
        return [unit.weight * (SOFT_INJECTION_BASE ** (n - 1 - i) if soft else 1.0) for i in range(n)]

    def _residuals(self, active: ActiveUnit, sample, timestep, given):
        net, unit = active.controlnet, active.unit
        latents = sample[:, :4]  # an inpainting UNet's mask and masked image are not the ControlNet's
        hint = active.hint(tuple(latents.shape[-2:]), latents.shape[0], net.device, net.dtype)
        cast = lambda t: t.to(device=net.device, dtype=net.dtype) if torch.is_tensor(t) and t.is_floating_point() else t  # noqa: E731
        added = given.get("added_cond_kwargs")
        down, mid = net(cast(latents), timestep, encoder_hidden_states=cast(given["encoder_hidden_states"]),
                        controlnet_cond=hint, conditioning_scale=1.0, return_dict=False,
                        added_cond_kwargs=None if added is None else {k: cast(v) for k, v in added.items()})
        outs = [*down, mid]
        outs = [o.to(dtype=sample.dtype, device=sample.device) * s for o, s in zip(outs, self._scales(unit, len(outs)))]
        if unit.control_mode == "ControlNet is more important" and self.run.cfg_halves(sample.shape[0]):
            # the control acts on the prompt's half only, so CFG pushes the picture toward it
            keep = torch.ones(sample.shape[0], 1, 1, 1, dtype=sample.dtype, device=sample.device)
            keep[: sample.shape[0] // 2] = 0
            outs = [o * keep for o in outs]
        return outs[:-1], outs[-1]


class ControlNetKind:
    """ControlNet units as one of a job's networks (engine.networks.JobNetwork)."""
    name = "controlnet"

    def __init__(self, controlnets: ControlNets):
        self.controlnets = controlnets

    @contextlib.contextmanager
    def for_job(self, run):
        units = run.request.controlnet
        if not units:
            yield None
            return
        unet = run.model.pipe.unet
        request = run.request
        active, paths = [], set()
        for i, unit in enumerate(units):
            where = f"controlnet[{i}].model"
            file = self.controlnets.resolve(unit.model, where)
            net = self.controlnets.load(file, unet, where)
            paths.add(str(file.entry.path))
            res = pixel_perfect_resolution(unit, request.width, request.height) if unit.pixel_perfect \
                else unit.processor_res
            detected = preprocess(unit.module, unit.image, res, unit.threshold_a, unit.threshold_b)
            stat = file.entry.path.stat()
            active.append(ActiveUnit(unit, file.title, net, detected, f"{file.hash}-{stat.st_size}", hint_factor(net)))
        self.controlnets.keep_only(paths)
        ov = self._on_openvino(run, active) if run.model.openvino is not None else None
        yield JobPart({f"ControlNet {i}": a.unit.infotext(a.title) for i, a in enumerate(active)},
                      functools.partial(_on_pass, active, run, ov))

    def _on_openvino(self, run, active: list[ActiveUnit]):
        """The units' OpenVINO graphs (engine.networks.controlnet_openvino), or None with a note
        saying why the UNet's steps run on torch."""
        compiled = run.model.openvino
        why = None
        if any(unet_weight for _, _, unet_weight in run.model.lora_weights):
            why = "with LoRAs, the UNet's steps ran on torch (the LoRAs' fused OpenVINO graphs take no residuals yet)"
        elif compiled.compression:
            why = "the UNet's steps ran on torch (its int8 OpenVINO graph takes no residuals)"
        if why is None:
            from engine.networks.controlnet_openvino import (OpenVINOControl, compile_controlnet, controlled_unet,
                                                             controlnet_entry)

            try:
                unet = run.model.pipe.unet
                entries = [controlnet_entry(a.controlnet, a.file_hash, unet, a.factor, compiled, run.notes)
                           for a in active]
                for a in active:  # OpenVINO will hold its own copy: torch's (1.4 GB for SD 1.5 in f32) goes first
                    self.controlnets.forget(a.controlnet)
                    a.controlnet = None
                # One compiled UNet in memory: the plain graphs go before the ControlNet one compiles
                # (a later plain job compiles them again from their blob).
                compiled.compiled.unload()
                compiled.compiled_reuse.unload()
                controlled = controlled_unet(compiled, unet, run.notes)
                nets = [compile_controlnet(xml, compiled) for xml in entries]
                return OpenVINOControl(compiled, controlled, nets, unet.config.addition_embed_type == "text_time")
            except Exception as error:  # noqa: BLE001 - torch still runs the ControlNet and the UNet
                logger.warning("ControlNet on OpenVINO failed: %s", error)
                why = f"the UNet's steps ran on torch (OpenVINO could not take the ControlNet: {type(error).__name__})"
        run.notes.append(f"ControlNet: {why}")
        return None


def pixel_perfect_resolution(unit: ControlUnit, width: int, height: int) -> int:
    """Pixel perfect (sd-webui-controlnet's): the map is made at the resolution that the resize to
    the picture's size will not scale again: the unit image's short side times the larger of the two
    scale factors (the smaller for Resize and Fill, which fits the image inside)."""
    raw_w, raw_h = unit.image.size
    k_h, k_w = height / raw_h, width / raw_w
    k = min(k_h, k_w) if unit.resize_mode == "Resize and Fill" else max(k_h, k_w)
    return max(64, round(k * min(raw_h, raw_w)))


@contextlib.contextmanager
def _on_pass(active: list[ActiveUnit], run, ov, unet):
    from diffusers.hooks import HookRegistry

    registry = HookRegistry.check_if_exists_or_initialize(unet)
    registry.register_hook(AddControl(active, run, ov), HOOK_NAME)  # outermost: after OpenVINO's hook
    try:
        yield
    finally:
        registry.remove_hook(HOOK_NAME, recurse=False)
