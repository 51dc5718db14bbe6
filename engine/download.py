"""Fetch a default model from the Hugging Face hub when the user has none (and is online).

huggingface_hub does the work: it resumes a partial download (it keeps `.incomplete` files) and
shows a progress bar. This path cannot be exercised offline; everything else in Easel works
without it once a checkpoint is on disk.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from engine.errors import EaselError
from engine.library import CHECKPOINT_DIR


@dataclass(frozen=True)
class DefaultModel:
    repo_id: str
    filename: str
    size_gb: float


DEFAULT_MODEL = DefaultModel("stable-diffusion-v1-5/stable-diffusion-v1-5", "v1-5-pruned-emaonly.safetensors", 4.3)


def download_default_model(models_dir: Path, model: DefaultModel = DEFAULT_MODEL) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    from huggingface_hub.utils import logging as hub_logging

    # The hub client logs every retry ("Retrying in 8s [Retry 3/5]"); the user gets one line from us.
    hub_logging.set_verbosity_error()

    dest_dir = Path(models_dir) / CHECKPOINT_DIR
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / model.filename
    if dest.is_file():
        return dest
    free_gb = shutil.disk_usage(dest_dir).free / 2**30
    if free_gb < model.size_gb + 1:
        raise EaselError(f"download: {model.filename} needs {model.size_gb} GB but {dest_dir} has {free_gb:.1f} GB free")
    try:
        # local_dir writes the real file (no cache symlinks) and resumes from its .incomplete part.
        path = hf_hub_download(model.repo_id, model.filename, local_dir=str(dest_dir))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
        raise EaselError(f"download: could not fetch {model.repo_id}/{model.filename} ({type(e).__name__}); "
                         f"are you online? You can also put any .safetensors checkpoint in {dest_dir}") from None
    return Path(path)
