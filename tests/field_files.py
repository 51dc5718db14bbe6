"""Tiny weight files in the layouts people download, for the tests: the same keys and nesting as
the real releases, random weights, a few kB each.

- Real-ESRGAN / BasicSR releases (RealESRGAN_x4plus.pth, RealESRNet, SwinIR): a pickle holding
  `{"params_ema": {...}}` and often `{"params": {...}}` beside it; new-arch RRDBNet key names
  (conv_first, body.N.rdbM.convK, conv_body, conv_up1/2, conv_hr, conv_last).
- Old-arch ESRGAN files (4x-UltraSharp and most of the community's early models): a flat pickle
  with `model.N` key names (model.0, model.1.sub.N.RDBM.convK.0, model.3, model.6, model.8,
  model.10).
- SwinIR's official releases: `{"params": {...}}` (the GAN ones `{"params_ema": {...}}`).
- DataParallel saves: every key starting with `module.`; Lightning: `{"state_dict": {...},
  "global_step": ..., "epoch": ..., "optimizer_states": [...]}`.
"""
from __future__ import annotations

from pathlib import Path

import torch

FEAT, GROW = 8, 32  # spandrel's RRDB fixes the growth channels at 32


def rrdb_state_dict(seed: int = 0, blocks: int = 1, feat: int = FEAT, up_convs: int = 2) -> dict:
    """A random RRDBNet in Real-ESRGAN's (new-arch) layout; 2 upsampling convs = 4x, 1 = 2x."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}

    def conv(name, cout, cin, bias=0.0):
        sd[f"{name}.weight"] = torch.randn(cout, cin, 3, 3, generator=gen) * (1.0 / (cin * 9)) ** 0.5
        sd[f"{name}.bias"] = torch.full((cout,), bias)

    conv("conv_first", feat, 3)
    for b in range(blocks):
        for r in (1, 2, 3):
            for k in range(1, 6):
                conv(f"body.{b}.rdb{r}.conv{k}", feat if k == 5 else GROW, feat + (k - 1) * GROW)
    conv("conv_body", feat, feat)
    for u in range(1, up_convs + 1):
        conv(f"conv_up{u}", feat, feat)
    conv("conv_hr", feat, feat)
    conv("conv_last", 3, feat, bias=0.5)
    return sd


def old_esrgan_layout(new: dict, blocks: int = 1) -> dict:
    """The same 4x RRDBNet under old-arch ESRGAN's `model.N` names (4x-UltraSharp's layout)."""
    names = {"conv_first": "model.0", "conv_body": f"model.1.sub.{blocks}", "conv_up1": "model.3",
             "conv_up2": "model.6", "conv_hr": "model.8", "conv_last": "model.10"}
    old = {}
    for key, value in new.items():
        module, _, param = key.rpartition(".")
        if module.startswith("body."):
            _, b, rdb, conv = module.split(".")
            name = f"model.1.sub.{b}.RDB{rdb[3:]}.{conv}.0"
        else:
            name = names[module]
        old[f"{name}.{param}"] = value
    return old


def swinir_state_dict(seed: int = 0) -> dict:
    """A tiny random SwinIR x4 (real-world SR's nearest+conv upsampler), with the official key names."""
    import engine.compat  # noqa: F401 - spandrel imports torchvision: the operator shim first
    from spandrel.architectures.SwinIR import SwinIR

    torch.manual_seed(seed)
    model = SwinIR(img_size=16, patch_size=1, in_chans=3, embed_dim=12, depths=[1], num_heads=[2], window_size=4,
                   mlp_ratio=2.0, upscale=4, img_range=1.0, upsampler="nearest+conv", resi_connection="1conv")
    return {k: v.clone() for k, v in model.state_dict().items()}


def realesrgan_x4plus(dest: Path, seed: int = 0) -> Path:
    """RealESRGAN_x4plus.pth as xinntao ships it: `params_ema` (the one to use) beside `params`."""
    torch.save({"params_ema": rrdb_state_dict(seed), "params": rrdb_state_dict(seed + 100)}, dest)
    return dest


def swinir_release(dest: Path, seed: int = 0) -> Path:
    torch.save({"params": swinir_state_dict(seed)}, dest)
    return dest


def ultrasharp(dest: Path, seed: int = 0) -> Path:
    """4x-UltraSharp.pth's layout: a flat old-arch ESRGAN state dict."""
    torch.save(old_esrgan_layout(rrdb_state_dict(seed)), dest)
    return dest


def data_parallel(state: dict) -> dict:
    return {f"module.{k}": v for k, v in state.items()}


def lightning(state: dict) -> dict:
    """A PyTorch Lightning checkpoint around `state`, as the original SD trainers saved theirs."""
    return {"epoch": 3, "global_step": 470000, "pytorch-lightning_version": "1.4.2", "state_dict": state,
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]}],
            "lr_schedulers": []}
