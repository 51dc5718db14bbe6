"""Test helper: write a diffusers pipeline as an original-layout single file plus its sidecar yaml.

diffusers only converts the other way (original -> diffusers), so tests that need the files users
actually download build them here: UNet under `model.diffusion_model.*` (LDM block numbering),
VAE under `first_stage_model.*`, OpenAI CLIP under `cond_stage_model.transformer.*`, OpenCLIP
under `cond_stage_model.model.*` with q/k/v fused into `in_proj_*`, SDXL's two encoders under
`conditioner.embedders.{0,1}.*`. The sidecar yaml describes the tiny model in LDM terms, which is
how the loader learns its (non-standard) sizes.
"""
from __future__ import annotations

from pathlib import Path

import torch
import yaml

import engine.compat  # noqa: F401 - torchvision shim before diffusers
from engine.families import (
    CLIP_PREFIX,
    OPEN_CLIP_PREFIX,
    SDXL_CLIP_PREFIX,
    SDXL_OPEN_CLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    Family,
)

_OPEN_CLIP_FAMILIES = (Family.SD2, Family.SD2_V, Family.SD2_INPAINT, Family.SD_X4_UPSCALER)


def _rename(state: dict, prefixes: dict[str, str], inner: dict[str, str]) -> dict:
    """Rename each key by its longest matching module prefix, then its inner module names."""
    out = {}
    ordered = sorted(prefixes, key=len, reverse=True)
    for key, value in state.items():
        for old in ordered:
            if key.startswith(old + "."):
                rest = key[len(old) + 1:]
                for a, b in inner.items():
                    rest = rest.replace(a, b)
                key = prefixes[old] + "." + rest
                break
        out[key] = value
    return out


_UNET_RESNET = {"norm1.": "in_layers.0.", "conv1.": "in_layers.2.", "time_emb_proj.": "emb_layers.1.",
                "norm2.": "out_layers.0.", "conv2.": "out_layers.3.", "conv_shortcut.": "skip_connection."}


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    cfg = unet.config
    per = cfg.layers_per_block
    if not isinstance(per, int):
        raise ValueError("the exporter handles one layers_per_block for all blocks")
    top = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
           "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
           "class_embedding.linear_1": "label_emb.0.0", "class_embedding.linear_2": "label_emb.0.2",
           "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
           "class_embedding": "label_emb",  # the upscaler's noise-level nn.Embedding
           "mid_block.attentions.0": "middle_block.1"}
    resnets = {"mid_block.resnets.0": "middle_block.0", "mid_block.resnets.1": "middle_block.2"}
    # LDM numbers blocks in one flat list: input_blocks.0 is conv_in, then per level `per`
    # (resnet, attention) pairs and a downsampler; output_blocks has per+1 pairs per level.
    for i, up_type in enumerate(cfg.up_block_types):
        for j in range(per):
            resnets[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{i * (per + 1) + j + 1}.0"
            top[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{i * (per + 1) + j + 1}.1"
        top[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{(i + 1) * (per + 1)}.0.op"
        for j in range(per + 1):
            resnets[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{i * (per + 1) + j}.0"
            top[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{i * (per + 1) + j}.1"
        slot = 2 if "CrossAttn" in up_type else 1  # after the attention, if the level has one
        top[f"up_blocks.{i}.upsamplers.0"] = f"output_blocks.{i * (per + 1) + per}.{slot}"
    state = unet.state_dict()
    resnet_keys = {k: v for k, v in state.items() if any(k.startswith(p + ".") for p in resnets)}
    out = _rename(resnet_keys, resnets, _UNET_RESNET)
    out.update(_rename({k: v for k, v in state.items() if k not in resnet_keys}, top, {}))
    return {UNET_PREFIX + k: v for k, v in out.items()}


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    levels = len(vae.config.block_out_channels)
    prefixes = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"}
    for part in ("encoder", "decoder"):
        prefixes[f"{part}.mid_block.resnets.0"] = f"{part}.mid.block_1"
        prefixes[f"{part}.mid_block.resnets.1"] = f"{part}.mid.block_2"
        prefixes[f"{part}.mid_block.attentions.0"] = f"{part}.mid.attn_1"
    for i in range(levels):
        prefixes[f"encoder.down_blocks.{i}.resnets"] = f"encoder.down.{i}.block"
        prefixes[f"encoder.down_blocks.{i}.downsamplers.0"] = f"encoder.down.{i}.downsample"
        # The decoder's levels run the other way round in LDM.
        prefixes[f"decoder.up_blocks.{i}.resnets"] = f"decoder.up.{levels - 1 - i}.block"
        prefixes[f"decoder.up_blocks.{i}.upsamplers.0"] = f"decoder.up.{levels - 1 - i}.upsample"
    inner = {"conv_shortcut.": "nin_shortcut.", "group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.",
             "to_v.": "v.", "to_out.0.": "proj_out."}
    out = _rename(vae.state_dict(), prefixes, inner)
    for key, value in out.items():
        if ".mid.attn_1." in key and key.endswith("weight") and value.ndim == 2:
            out[key] = value[:, :, None, None]  # LDM's attention projections are 1x1 convolutions
    return {VAE_PREFIX + k: v for k, v in out.items()}


def _text_state(text_encoder) -> dict[str, torch.Tensor]:
    return {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}


def clip_to_ldm(text_encoder, prefix: str) -> dict[str, torch.Tensor]:
    """OpenAI CLIP keeps transformers' own names in LDM files, under `<prefix>text_model.`."""
    return {f"{prefix}text_model.{k}": v for k, v in _text_state(text_encoder).items()}


def open_clip_to_ldm(text_encoder, prefix: str, *, unused_last_layer: bool) -> dict[str, torch.Tensor]:
    """open_clip's names; `unused_last_layer` adds the final resblock SD 2.x files carry but skip."""
    state = _text_state(text_encoder)
    layers = text_encoder.config.num_hidden_layers
    hidden = text_encoder.config.hidden_size
    out = {
        prefix + "token_embedding.weight": state["embeddings.token_embedding.weight"],
        prefix + "positional_embedding": state["embeddings.position_embedding.weight"],
        prefix + "ln_final.weight": state["final_layer_norm.weight"],
        prefix + "ln_final.bias": state["final_layer_norm.bias"],
        # open_clip applies x @ text_projection; transformers' Linear stores the transpose.
        prefix + "text_projection": (state["text_projection.weight"].T.contiguous() if "text_projection.weight" in state
                                     else torch.eye(hidden)),
    }
    for i in range(layers + (1 if unused_last_layer else 0)):
        src, dst = f"encoder.layers.{min(i, layers - 1)}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = torch.cat(
                [state[src + f"self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")])
            for a, b in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                         ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                out[dst + f"{b}.{kind}"] = state[src + f"{a}.{kind}"]
    return out


def pipeline_to_ldm(pipe, family: Family) -> dict[str, torch.Tensor]:
    state = {**unet_to_ldm(pipe.unet), **vae_to_ldm(pipe.vae)}
    if family is Family.SDXL:
        state.update(clip_to_ldm(pipe.text_encoder, SDXL_CLIP_PREFIX))
        state.update(open_clip_to_ldm(pipe.text_encoder_2, SDXL_OPEN_CLIP_PREFIX, unused_last_layer=False))
    elif family in _OPEN_CLIP_FAMILIES:
        state.update(open_clip_to_ldm(pipe.text_encoder, OPEN_CLIP_PREFIX, unused_last_layer=True))
    else:
        state.update(clip_to_ldm(pipe.text_encoder, CLIP_PREFIX))
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


# --- the matching LDM yaml ---------------------------------------------------------------------

def _unet_params(unet) -> dict:
    cfg = unet.config
    base = cfg.block_out_channels[0]
    params = {
        "in_channels": cfg.in_channels, "out_channels": cfg.out_channels, "model_channels": base,
        "attention_resolutions": [2 ** i for i, t in enumerate(cfg.down_block_types) if "CrossAttn" in t],
        "num_res_blocks": cfg.layers_per_block, "channel_mult": [c // base for c in cfg.block_out_channels],
        "use_spatial_transformer": True, "context_dim": cfg.cross_attention_dim, "legacy": False,
        "use_linear_in_transformer": bool(cfg.use_linear_projection),
        "transformer_depth": (cfg.transformer_layers_per_block if isinstance(cfg.transformer_layers_per_block, int)
                              else list(cfg.transformer_layers_per_block)),
    }
    heads = cfg.num_attention_heads or cfg.attention_head_dim  # diffusers' "head dim" counts heads
    if isinstance(heads, int):
        params["num_heads"] = heads
    else:
        widths = {c // h for c, h in zip(cfg.block_out_channels, heads)}
        if len(widths) != 1:
            raise ValueError("LDM needs one head width across levels")
        params["num_head_channels"] = widths.pop()
    if cfg.num_class_embeds is not None:
        params["num_classes"] = cfg.num_class_embeds
    if isinstance(cfg.only_cross_attention, (list, tuple)):
        params["disable_self_attentions"] = list(cfg.only_cross_attention)
    if cfg.addition_embed_type == "text_time":
        params["num_classes"] = "sequential"
        params["adm_in_channels"] = cfg.projection_class_embeddings_input_dim
    return params


def _vae_params(vae) -> dict:
    cfg = vae.config
    base = cfg.block_out_channels[0]
    return {
        "embed_dim": cfg.latent_channels,
        "ddconfig": {"double_z": True, "z_channels": cfg.latent_channels, "resolution": 256,
                     "in_channels": cfg.in_channels, "out_ch": cfg.out_channels, "ch": base,
                     "ch_mult": [c // base for c in cfg.block_out_channels], "num_res_blocks": cfg.layers_per_block,
                     "attn_resolutions": [], "dropout": 0.0},
    }


_TARGETS = {
    Family.SD1_INPAINT: "ldm.models.diffusion.ddpm.LatentInpaintDiffusion",
    Family.SD2_INPAINT: "ldm.models.diffusion.ddpm.LatentInpaintDiffusion",
    Family.SD_X4_UPSCALER: "ldm.models.diffusion.ddpm.LatentUpscaleDiffusion",
}


def ldm_config(pipe, family: Family) -> dict:
    """An LDM (or, for SDXL, sgm) inference yaml describing this pipeline's sizes."""
    sched = pipe.scheduler.config
    first_stage = {"target": "ldm.models.autoencoder.AutoencoderKL", "params": _vae_params(pipe.vae)}
    if family is Family.SDXL:
        time_embedder = {"target": "sgm.modules.encoders.modules.ConcatTimestepEmbedderND",
                         "params": {"outdim": pipe.unet.config.addition_time_embed_dim}}
        return {"model": {"target": "sgm.models.diffusion.DiffusionEngine", "params": {
            "scale_factor": pipe.vae.config.scaling_factor,
            "denoiser_config": {"target": "sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser", "params": {
                "num_idx": 1000,
                "scaling_config": {"target": "sgm.modules.diffusionmodules.denoiser_scaling.EpsScaling"}}},
            "network_config": {"target": "sgm.modules.diffusionmodules.openaimodel.UNetModel",
                               "params": _unet_params(pipe.unet)},
            "conditioner_config": {"target": "sgm.modules.GeneralConditioner", "params": {"emb_models": [
                {"target": "sgm.modules.encoders.modules.FrozenCLIPEmbedder", "params": {"layer": "hidden", "layer_idx": 11}},
                {"target": "sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2",
                 "params": {"layer": "penultimate", "always_return_pooled": True, "legacy": False}},
                time_embedder, time_embedder, time_embedder]}},
            "first_stage_config": first_stage}}}
    params = {
        "linear_start": sched.beta_start, "linear_end": sched.beta_end, "timesteps": sched.num_train_timesteps,
        "scale_factor": pipe.vae.config.scaling_factor, "channels": 4,
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": _unet_params(pipe.unet)},
        "first_stage_config": first_stage,
        "cond_stage_config": (
            {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder", "params": {"freeze": True, "layer": "penultimate"}}
            if family in _OPEN_CLIP_FAMILIES else {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}),
    }
    if sched.prediction_type == "v_prediction":
        params["parameterization"] = "v"
    if family is Family.SD_X4_UPSCALER:
        low = pipe.low_res_scheduler.config
        params["low_scale_config"] = {
            "target": "ldm.modules.diffusionmodules.upscaling.ImageConcatWithNoiseAugmentation",
            "params": {"noise_schedule_config": {"linear_start": low.beta_start, "linear_end": low.beta_end},
                       "max_noise_level": pipe.config.max_noise_level}}
    return {"model": {"target": _TARGETS.get(family, "ldm.models.diffusion.ddpm.LatentDiffusion"), "params": params}}


def write_yaml(config: dict, dest: Path) -> Path:
    dest.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return dest


def export_single_file(pipe, family: Family, dest: Path, *, sidecar: bool = True) -> Path:
    """Write `pipe` to `dest` (.safetensors, or .ckpt as a plain-tensor pickle) and `dest.yaml` beside it."""
    state = pipeline_to_ldm(pipe, family)
    if dest.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(dest))
    else:
        torch.save({"state_dict": state}, dest)
    if sidecar:
        write_yaml(ldm_config(pipe, family), dest.with_suffix(".yaml"))
    return dest


def controlnet_to_ldm(controlnet, prefix: str = "control_model.") -> dict[str, torch.Tensor]:
    """A diffusers ControlNetModel in lllyasviel's original layout (control_v11p_sd15_canny.pth):
    the UNet's encoder half numbered as LDM numbers it, zero_convs.N.0 for the residual convs,
    middle_block_out.0, and the hint encoder as input_hint_block.{0, 2, 4, ..., 14} (its SiLUs
    sit between the convolutions, at the odd places). `prefix`: "control_model." as the v1.0 and
    v1.1 releases ship, "" as some re-releases do."""
    cfg = controlnet.config
    per = cfg.layers_per_block
    top = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
           "conv_in": "input_blocks.0.0", "add_embedding.linear_1": "label_emb.0.0",
           "add_embedding.linear_2": "label_emb.0.2", "mid_block.attentions.0": "middle_block.1",
           "controlnet_mid_block": "middle_block_out.0", "controlnet_cond_embedding.conv_in": "input_hint_block.0"}
    blocks = 2 * (len(cfg.conditioning_embedding_out_channels) - 1)
    top["controlnet_cond_embedding.conv_out"] = f"input_hint_block.{2 * (blocks + 1)}"
    for k in range(blocks):
        top[f"controlnet_cond_embedding.blocks.{k}"] = f"input_hint_block.{2 * (k + 1)}"
    resnets = {"mid_block.resnets.0": "middle_block.0", "mid_block.resnets.1": "middle_block.2"}
    for i in range(len(cfg.down_block_types)):
        for j in range(per):
            resnets[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{i * (per + 1) + j + 1}.0"
            top[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{i * (per + 1) + j + 1}.1"
        top[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{(i + 1) * (per + 1)}.0.op"
    for n in range(len(cfg.down_block_types) * (per + 1)):
        top[f"controlnet_down_blocks.{n}"] = f"zero_convs.{n}.0"
    state = controlnet.state_dict()
    resnet_keys = {k: v for k, v in state.items() if any(k.startswith(p + ".") for p in resnets)}
    out = _rename(resnet_keys, resnets, _UNET_RESNET)
    out.update(_rename({k: v for k, v in state.items() if k not in resnet_keys}, top, {}))
    return {prefix + k: v.contiguous() for k, v in out.items()}
