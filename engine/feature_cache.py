"""Feature reuse across denoising steps (the DeepCache idea), Easel's opt-in "fast" speed.

Between adjacent sampling steps a UNet's deep, low-resolution features barely change; its last,
full-resolution layer is what turns them into this step's detail. On a *full* step the UNet runs
whole and every skipped part remembers its output; on the *reuse* steps that follow, only the
UNet's input conv, the last layer of its last up block (fed by the remembered features and the
fresh skip connection from the input conv) and its output head run. For SD 1.5 at 512x512 a reuse
step is 8% of a full step's FLOPs and time (`docs/benchmarks.md`), so one full step in four makes
the UNet about 3.2x cheaper. The image changes a little: this is an opt-in trade, never the default.

The hooks are diffusers' own `HookRegistry` / `ModelHook` (the mechanism its FasterCache and
FirstBlockCache use); only the choice of what to skip and when is ours. diffusers' caches target
transformer (DiT) models and do not apply to a UNet.

On OpenVINO (engine.openvino_backend) the same steps run as two compiled graphs, the full one
returning the deep features (`feature_part`'s output) and the reuse step's one taking them; which
call is which is decided by the same `ReuseClock`, and these hooks are what that second graph is
traced through.

    with FeatureReuse(pipe.unet, interval=4) as reuse:
        pipe(...)
    reuse.full_steps, reuse.reused_steps
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from engine import compat  # noqa: F401 - torchvision shim before transformers/diffusers
from diffusers.hooks import HookRegistry, ModelHook

HOOK_NAME = "easel_feature_reuse"
# One full UNet step, then INTERVAL - 1 reuse steps: 4 is the first interval that cleared 2.5x end
# to end with room to spare (each interval's speed and PSNR: docs/benchmarks.md).
INTERVAL = 4
MIN_STEPS = 10   # fewer steps (LCM, turbo, short img2img) move too far per step to reuse anything


def step_key(sample: torch.Tensor, encoder_hidden_states: torch.Tensor | None) -> tuple:
    """What must stay the same for a step to reuse the last full step's features: anything that
    changes their shape forces a full step (a batch of 2 for CFG turning into 1, a new size, a new
    prompt length)."""
    return (tuple(sample.shape), sample.dtype, sample.device,
            None if encoder_hidden_states is None else tuple(encoder_hidden_states.shape))


@dataclass
class ReuseClock:
    """Decides, call by call, whether the UNet runs a full or a reuse step. The one rule for both
    backends: torch's hooks here and OpenVINO's two compiled parts (engine.openvino_backend)."""
    interval: int
    reusing: bool = False
    since_full: int = 0
    last_key: tuple | None = None
    full_steps: int = 0
    reused_steps: int = 0

    def tick(self, key: tuple | None) -> bool:
        """Count this call and say whether it reuses; key None (a call that cannot reuse, nor be
        reused from) is a full step, and the next call is one too."""
        self.reusing = key is not None and key == self.last_key and self.since_full < self.interval - 1
        if self.reusing:
            self.since_full += 1
            self.reused_steps += 1
        else:
            self.since_full = 0
            self.full_steps += 1
        self.last_key = key
        return self.reusing


class _StepClock(ModelHook):
    """On the UNet itself: decides, before each call, whether this one is a full or a reuse step."""

    def __init__(self, clock: ReuseClock):
        super().__init__()
        self.clock = clock

    def pre_forward(self, module, *args, **kwargs):
        sample = args[0] if args else kwargs["sample"]
        hidden = args[2] if len(args) > 2 else kwargs.get("encoder_hidden_states")
        self.clock.tick(step_key(sample, hidden))
        return args, kwargs


class _Remember(ModelHook):
    """On a skipped part: run and remember on a full step, hand back the memory on a reuse step."""

    def __init__(self, clock: ReuseClock):
        super().__init__()
        self.clock = clock
        self.output = None

    def new_forward(self, module, *args, **kwargs):
        if self.clock.reusing and self.output is not None:
            return self.output
        self.output = self.fn_ref.original_forward(*args, **kwargs)
        return self.output


def skipped_parts(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """What a reuse step leaves out: every down block, the mid block, every up block but the last,
    and all layers of the last up block except its final one. The final layer's inputs are the
    previous layer's (remembered) output and the input conv's output, both available."""
    for name in ("down_blocks", "mid_block", "up_blocks", "conv_in", "conv_out"):
        if not hasattr(unet, name):
            raise TypeError(f"feature reuse needs a diffusers UNet; {type(unet).__name__} has no {name}")
    last = unet.up_blocks[-1]
    if getattr(last, "upsamplers", None) is not None:
        raise TypeError("feature reuse needs a UNet whose last up block does not upsample")
    parts = [*unet.down_blocks, *unet.up_blocks[:-1]]
    if unet.mid_block is not None:
        parts.append(unet.mid_block)
    resnets = list(last.resnets)
    attentions = list(getattr(last, "attentions", None) or [])
    if len(resnets) < 2:
        raise TypeError("feature reuse needs at least two layers in the UNet's last up block")
    parts += resnets[:-1] + attentions[:-1]
    return parts


def feature_part(unet: torch.nn.Module) -> torch.nn.Module:
    """The skipped part whose output a reuse step feeds to the last layer: the deep features (the
    last up block's second-to-last attention, or its second-to-last resnet when it has none)."""
    skipped_parts(unet)  # the same checks
    last = unet.up_blocks[-1]
    attentions = list(getattr(last, "attentions", None) or [])
    return attentions[-2] if attentions else last.resnets[-2]


class FeatureReuse:
    """Attach to a UNet for one generation; detaches on exit, leaving the UNet as it was."""

    def __init__(self, unet: torch.nn.Module, interval: int = INTERVAL):
        if interval < 1:
            raise ValueError("interval must be at least 1")
        self.unet = unet
        self.clock = ReuseClock(interval)
        self._parts = skipped_parts(unet)

    @property
    def full_steps(self) -> int:
        return self.clock.full_steps

    @property
    def reused_steps(self) -> int:
        return self.clock.reused_steps

    def __enter__(self) -> "FeatureReuse":
        HookRegistry.check_if_exists_or_initialize(self.unet).register_hook(_StepClock(self.clock), HOOK_NAME)
        for part in self._parts:
            HookRegistry.check_if_exists_or_initialize(part).register_hook(_Remember(self.clock), HOOK_NAME)
        return self

    def __exit__(self, *exc) -> None:
        # Drop the remembered tensors with the hooks (they hold a full set of UNet activations).
        for module in (self.unet, *self._parts):
            registry = getattr(module, "_diffusers_hook", None)
            if registry is not None:
                registry.remove_hook(HOOK_NAME, recurse=False)
