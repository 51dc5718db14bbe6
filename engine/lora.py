"""LoRA files (`models/Lora`, `models/LyCORIS`), applied per job from the prompt's `<lora:NAME:WEIGHT>`
tags through diffusers' own LoRA loading (peft), so kohya/A1111 and diffusers key layouts are
converted by diffusers, not by us.

- A file is read only through `engine.safe_files` (safetensors header checks, the pickle scan);
  diffusers gets the state dict, never the path, so it cannot torch.load anything itself.
- Adapters are never fused: the base weights are not touched, a job without LoRAs unloads them
  all (the UNet and text encoders are then exactly as loaded), and a job with other LoRAs deletes
  the ones it does not use. Adapters the next job uses again stay loaded.
- Before diffusers sees a file, its keys and shapes say what it is: LyCORIS kinds diffusers cannot
  load (LoHa, LoKr, ...) and LoRAs for another family are refused in one line naming both.
"""
from __future__ import annotations

import hashlib
import re
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Mapping

from engine.errors import EaselError, RequestError
from engine.library import ModelEntry, ModelLibrary
from engine.prompt_syntax import LoraTag, extract_loras

KIND = "LoRA"  # engine.library.EXTRA_KINDS: models/Lora and models/LyCORIS

# LyCORIS networks diffusers has no loader for, by a key part only they use.
UNSUPPORTED_KINDS = (
    ("hada_w1", "LoHa"), ("lokr_w1", "LoKr"), ("lokr_w2", "LoKr"), (".diff", "full-weight (diff)"),
    (".a1.weight", "GLoRA"), (".on_input", "(IA)^3"), ("oft_blocks", "OFT"), ("oft_diag", "OFT"),
    ("boft_", "BOFT"), ("dora_scale", "DoRA"),
)
# A LoRA's text conditioning width says which family it was trained on.
FAMILY_BY_WIDTH = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}
_TRANSFORMER_KEYS = ("double_blocks", "single_blocks", "joint_blocks", "lora_transformer_", "transformer.")
_DOWN_PARTS = ("lora_down", "lora_A", ".down.", "lora.down")
_UP_PARTS = ("lora_up", "lora_B", ".up.", "lora.up")
# LCM-LoRA (and kohya conversions of it): few-step sampling. Named so, or saying so in its metadata.
_LCM_WORD = re.compile(r"(^|[^a-z])lcm([^a-z]|$)")
_LCM_METADATA = ("ss_output_name", "modelspec.title", "modelspec.description", "ss_training_comment")


@dataclass(frozen=True)
class LoraFile:
    name: str        # the file's stem: what <lora:NAME> says
    entry: ModelEntry
    key: tuple       # (path, size, mtime): a changed file is a new adapter
    hash: str        # A1111's short hash (12 hex digits)
    zero: bool = False  # every up (B) matrix is 0: the LoRA changes nothing, at any weight

    @property
    def adapter(self) -> str:
        return f"lora_{self.hash}"  # peft's adapter names are module keys: no dots


def lora_hash(path: Path) -> str:
    """A1111's LoRA hash (extensions-builtin/Lora network.py): sha256 of a safetensors file's tensor
    bytes, after its header (kohya's "addnet" hash, the same for any metadata); of the whole file
    for other formats. The infotext's `Lora hashes` has its first 12 hex digits."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if path.suffix.lower() == ".safetensors":
            f.seek(8 + int.from_bytes(f.read(8), "little"))
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def unsupported_kind(keys) -> str | None:
    """The name of a LyCORIS kind diffusers cannot load, if the keys are one."""
    for key in keys:
        for part, kind in UNSUPPORTED_KINDS:
            if part in key:
                return kind
    return None


def trained_for(shapes: Mapping[str, tuple]) -> tuple[str | None, int | None, int | None, bool]:
    """(family in words, cross-attention width, text encoder width, has a second text encoder) of a
    LoRA from its key names and shapes; None where the file does not say."""
    if any(part in key for key in shapes for part in _TRANSFORMER_KEYS):
        return "a Flux or SD3 (transformer) model", None, None, False
    down = {k: s for k, s in shapes.items() if any(p in k for p in _DOWN_PARTS) and len(s) >= 2}
    context = next((s[1] for k, s in down.items() if "attn2" in k and ("to_k" in k or "to_v" in k)), None)
    text = next((s[1] for k, s in down.items() if ("lora_te_" in k or "lora_te1_" in k or k.startswith("text_encoder."))
                 and ("q_proj" in k or "k_proj" in k)), None)
    second = any(k.startswith(("lora_te2_", "text_encoder_2.")) for k in shapes)
    family = "SDXL" if second else FAMILY_BY_WIDTH.get(context) or FAMILY_BY_WIDTH.get(text)
    if family is None and context is not None:
        family = f"a model with {context}-wide text conditioning"
    return family, context, text, second


def check_family(name: str, shapes: Mapping[str, tuple], loaded) -> None:
    """EaselError naming both families when the LoRA was trained for another one than the model."""
    family, context, text, second = trained_for(shapes)
    pipe = loaded.pipe
    model_context = pipe.unet.config.cross_attention_dim
    model_text = pipe.text_encoder.config.hidden_size if getattr(pipe, "text_encoder", None) is not None else None
    has_second = getattr(pipe, "text_encoder_2", None) is not None
    fits = (family is None or not family.startswith("a Flux")) and \
        (context is None or context == model_context) and \
        (text is None or text == model_text) and (not second or has_second)
    if not fits:
        raise EaselError(f"lora: {name} is a LoRA for {family or 'another model family'}, and the checkpoint "
                         f"{loaded.name} is {loaded.info.label}; a LoRA works only with the family it was trained for")


def is_lcm(name: str, metadata: Mapping[str, str]) -> bool:
    """LCM-LoRA: its name says lcm (lcm-lora-sdv1-5, sdxl_lcm_lora), or its metadata does."""
    texts = [name, *(str(metadata.get(k, "")) for k in _LCM_METADATA)]
    return any(_LCM_WORD.search(t.lower()) for t in texts)


@dataclass(frozen=True)
class StepLora:
    """A step-distilled LoRA: few-step sampling with the settings its authors publish."""
    kind: str                     # "Hyper-SD", "SDXL-Lightning", "DMD2", "TCD", "LCM-LoRA"
    fields: Mapping[str, object]  # request fields: sampler, schedule_type, steps, cfg_scale
    families: tuple[str, ...]     # the family labels (engine.families) it is released for, by prefix


_STEPS = re.compile(r"(\d+)[-_ ]?steps?")
# In A1111's terms: CFG 1 is "no guidance" (diffusers' guidance_scale 0 or 1), and Euler with SGM
# Uniform is Euler on evenly spaced trailing timesteps, what SDXL-Lightning's and Hyper-SD's authors
# run (EulerDiscreteScheduler / DDIM with timestep_spacing="trailing"). TCD's own sampler (gamma
# 0.3) is not one of A1111's; LCM's is TCD's gamma-1 case, which its authors show works too. DMD2's
# authors run LCMScheduler at 4 steps (timesteps 999, 749, 499, 249; LCM's own 4 are within 10 of them).
_EULER_TRAILING = {"sampler": "Euler", "schedule_type": "SGM Uniform"}
# LCM-LoRA's authors use CFG 1-2; its UNet takes no guidance embedding, so above 1 costs a second pass.
_LCM_SAMPLING = {"sampler": "LCM", "schedule_type": "Automatic", "steps": 4, "cfg_scale": 1.0}


def step_lora(name: str, metadata: Mapping[str, str]) -> StepLora | None:
    """The step-distilled LoRA a file is, by the words its release's file names carry (Hyper-SD15-
    8steps-lora, sdxl_lightning_4step_lora, dmd2_sdxl_4step_lora, TCD-SD15-LoRA, lcm-lora-sdv1-5)
    or its metadata says; None for any other LoRA."""
    text = " ".join([name, *(str(metadata.get(k, "")) for k in _LCM_METADATA)]).lower()
    found = _STEPS.search(text)
    steps = int(found.group(1)) if found and 1 <= int(found.group(1)) <= 16 else None
    if re.search(r"hyper[-_ ]?sd", text):  # its CFG LoRAs (8steps-CFG, 12steps-CFG) are run at CFG 5-8
        return StepLora("Hyper-SD", {**_EULER_TRAILING, "steps": steps or 8, "cfg_scale": 5.0 if "cfg" in text else 1.0},
                        ("SD 1.x", "SDXL"))
    if "lightning" in text:
        return StepLora("SDXL-Lightning", {**_EULER_TRAILING, "steps": steps or 4, "cfg_scale": 1.0}, ("SDXL",))
    if re.search(r"(^|[^a-z])dmd2?([^a-z]|$)", text):
        return StepLora("DMD2", dict(_LCM_SAMPLING), ("SDXL",))
    if re.search(r"(^|[^a-z])tcd([^a-z]|$)", text):
        return StepLora("TCD", dict(_LCM_SAMPLING), ("SD 1.x", "SDXL"))
    if is_lcm(name, metadata):
        return StepLora("LCM-LoRA", dict(_LCM_SAMPLING), ("SD 1.x", "SDXL"))
    return None


class Loras:
    """The LoRA files in the models folder, and putting a prompt's LoRAs on a loaded model."""

    def __init__(self, library: ModelLibrary):
        self.library = library
        self._files: dict[tuple, LoraFile] = {}  # by file key: hashing a 200 MB file once is enough

    def names(self) -> list[str]:
        """What <lora:NAME> may say: each file's stem (A1111's name), in the folder's order."""
        return list(dict.fromkeys(_stem(e) for e in self.library.extra_entries(KIND)))

    def resolve(self, name: str) -> ModelEntry:
        """A LoRA by the name a tag gives: the file's stem, or its path inside Lora/ or LyCORIS/ with
        or without the extension. Looked up among the listed files only, never joined onto a path."""
        entries = self.library.extra_entries(KIND)
        wanted = name.strip()
        for match in (lambda e: _stem(e) == wanted, lambda e: wanted in (_inside(e), _inside(e).rsplit(".", 1)[0])):
            found = [e for e in entries if match(e)]
            if found:
                return found[0]
        known = ", ".join(self.names()) or "none"
        raise RequestError("prompt", f"<lora:{wanted}>: no such LoRA in {self.library.models_dir / 'Lora'} "
                                     f"or {self.library.models_dir / 'LyCORIS'}; available: {known}")

    def check(self, prompt: str) -> tuple[LoraTag, ...]:
        """The prompt's LoRA tags, each naming a file that exists (RequestError naming `prompt` if not)."""
        try:
            _, tags = extract_loras(prompt)
        except ValueError as error:
            raise RequestError("prompt", str(error)) from None
        for tag in tags:
            self.resolve(tag.name)
        return tags

    def step_lora(self, prompt: str, family_label: str) -> StepLora | None:
        """The step-distilled LoRA (step_lora) the prompt uses at a weight above 0, if any;
        RequestError naming `prompt` when it is one released for another family than `family_label`."""
        from engine.safe_files import read_metadata

        for tag in self.check(prompt):
            if tag.unet_weight == 0:
                continue
            entry = self.resolve(tag.name)
            try:
                metadata = read_metadata(entry.path)
            except EaselError:
                metadata = {}  # an unreadable file says why when it is loaded
            found = step_lora(_stem(entry), metadata)
            if found is None:
                continue
            if not family_label.startswith(found.families):
                raise RequestError("prompt", f"<lora:{tag.name}> is {found.kind}, a step LoRA released for "
                                             f"{' and '.join(found.families)}; this checkpoint is {family_label}")
            return found
        return None

    def _file(self, entry: ModelEntry) -> LoraFile:
        stat = entry.path.stat()
        key = (str(entry.path), stat.st_size, stat.st_mtime_ns)
        if key not in self._files:
            self._files[key] = LoraFile(_stem(entry), entry, key, lora_hash(entry.path), _all_zero(entry.path))
        return self._files[key]

    def apply(self, loaded, prompt: str) -> dict[str, str]:
        """Put the prompt's LoRAs, at their weights, on the loaded model (and only those); returns
        the infotext's `Lora hashes` pair, or {} with no LoRA."""
        tags = self.check(prompt)
        pipe = loaded.pipe
        if not tags:
            if loaded.loras:
                pipe.unload_lora_weights()  # the modules are the loaded ones again, bit for bit
                loaded.loras.clear()
                loaded.encoder.clear_cache()
            loaded.lora_weights = ()
            return {}
        wanted: dict[str, tuple[LoraFile, float, float, str]] = {}
        for tag in tags:  # the same file twice: its weights add up (A1111 applies it twice)
            file = self._file(self.resolve(tag.name))
            _, te, unet, said = wanted.get(file.adapter, (file, 0.0, 0.0, tag.name))
            wanted[file.adapter] = (file, te + tag.te_weight, unet + tag.unet_weight, said)
        # A LoRA at weight 0 (both parts), or whose up matrices are all 0, changes nothing: it is not
        # put on the model at all, so the job is the plain one, bit for bit, on every backend (people
        # sweep weights 0, 0.25, ... 1; with peft layers at scale 0 the text encoder would leave
        # OpenVINO and the 0 would move pixels). Its hash is still recorded: the prompt names it.
        # A1111's pair: the name as the prompt gives it, without ':' and ','.
        hashes = {"Lora hashes": ", ".join(f"{re.sub('[:,]', '', said)}: {file.hash}"
                                           for file, _, _, said in wanted.values())}
        for file, *_rest in wanted.values():  # a file of the wrong kind or family is refused at any weight
            self._check(loaded, file)
        wanted = {adapter: value for adapter, value in wanted.items()
                  if (value[1] != 0 or value[2] != 0) and not value[0].zero}
        if not wanted:
            self.apply(loaded, "")  # as a prompt without tags: every adapter off
            return hashes
        stale = [adapter for adapter in loaded.loras if adapter not in wanted]
        if stale:
            pipe.delete_adapters(stale)
            for adapter in stale:
                del loaded.loras[adapter]
        for adapter, (file, *_rest) in wanted.items():
            if adapter not in loaded.loras:
                self._load(loaded, file)
                loaded.loras[adapter] = file.key
        weights = tuple((adapter, te, unet) for adapter, (_, te, unet, _said) in wanted.items())
        if weights != loaded.lora_weights:
            parts = pipe.get_list_adapters()  # {"unet": [...], "text_encoder": [...]}
            pipe.set_adapters([w[0] for w in weights], [
                {part: (unet if part == "unet" else te) for part, names in parts.items() if adapter in names}
                for adapter, te, unet in weights])
            loaded.encoder.clear_cache()  # the text encoders' output changed with them
            loaded.lora_weights = weights
        return hashes

    @staticmethod
    def _check(loaded, file: LoraFile) -> None:
        """EaselError when the file is a LyCORIS kind diffusers cannot load, or for another family."""
        from engine.safe_files import read_shapes

        shapes = read_shapes(file.entry.path)
        kind = unsupported_kind(shapes)
        if kind is not None:
            raise EaselError(f"lora: {file.name} is a {kind} network (LyCORIS); diffusers cannot load that kind, "
                             "so Easel cannot: LoRA and LoCon files work")
        check_family(file.name, shapes, loaded)

    @staticmethod
    def _load(loaded, file: LoraFile) -> None:
        from engine.safe_files import read_tensors

        state = read_tensors(file.entry.path)
        try:
            with warnings.catch_warnings():
                # peft warns on every adapter after the first; several at once is what Easel wants.
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                loaded.pipe.load_lora_weights(state, adapter_name=file.adapter)
        except (ValueError, KeyError, RuntimeError) as error:
            lines = str(error).strip().splitlines() or [type(error).__name__]
            raise EaselError(f"lora: {file.name} could not be loaded: {lines[0][:300]}") from None


def _all_zero(path: Path) -> bool:
    """Whether every up (B) matrix of the LoRA file is 0 (then its product with any down matrix is)."""
    from engine.safe_files import read_tensors

    try:
        state = read_tensors(path)
    except EaselError:
        return False  # unreadable: loading it says why
    ups = [t for k, t in state.items() if any(part in k for part in _UP_PARTS)]
    return bool(ups) and all(not t.any() for t in ups)


def strip_loras(prompt: str) -> str:
    """The prompt as the text encoder gets it: without its `<lora:...>` tags."""
    return extract_loras(prompt)[0]


def _stem(entry: ModelEntry) -> str:
    return PurePosixPath(entry.name).name.rsplit(".", 1)[0]


def _inside(entry: ModelEntry) -> str:
    """The name inside Lora/ or LyCORIS/ ("styles/ink.safetensors")."""
    return entry.name.split("/", 1)[1] if "/" in entry.name else entry.name
