"""Textual-inversion embeddings, as A1111 keeps them: files in `embeddings/` beside the models folder
(also accepted: `models/embeddings`), each activated by its file name used as a word in a prompt.

Formats (A1111's `create_embedding_from_data`), read only through `engine.safe_files`:
- A1111 `.pt`: `string_to_param: {'*': tensor[n, D]}` (plus names and step counts, ignored);
- one tensor under any one key (`emb_params`, diffusers' `<token>` .bin files), [n, D] or [D];
- SDXL `.safetensors`: `clip_l` [n, 768] and `clip_g` [n, 1280], one for each text encoder.

An embedding whose widths do not fit the loaded model's text encoders is skipped for it (its name
stays plain text), as A1111 does. The vectors go in at the encoder's input: `embeddings_in_place`
writes them over the placeholder tokens `prompt_syntax.chunk_prompt` reserved for them.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch

from engine.errors import EaselError
from engine.prompt_syntax import CHUNK_LENGTH

logger = logging.getLogger(__name__)

KIND = "Embeddings"  # engine.library.EXTRA_KINDS


@dataclass(frozen=True, eq=False)  # compared by identity: one object per file version and model
class Embedding:
    name: str                           # the word that activates it: the file's stem
    path: Path
    vectors: tuple[torch.Tensor, ...]   # one [n, D] per text encoder of the model it is for
    hash: str                           # A1111's short hash: sha256 of the file, 12 hex digits

    @property
    def count(self) -> int:
        return int(self.vectors[0].shape[0])


def embedding_hash(path: Path) -> str:
    """A1111's embedding hash (`hashes.sha256` of the whole file); TI hashes show 12 hex digits."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def read_embedding(path: Path) -> dict[str, torch.Tensor]:
    """The vectors of an embedding file: {"clip_l": .., "clip_g": ..} (SDXL) or {"": [n, D]}.
    EaselError (naming the file) for anything that is not one embedding."""
    from engine.safe_files import read_nested_tensors

    tensors = {k: v for k, v in read_nested_tensors(path).items() if v.is_floating_point()}
    params = {k: v for k, v in tensors.items() if k.startswith("string_to_param.")}
    if params:
        tensors = params  # A1111's own files: the rest is bookkeeping
    if "clip_l" in tensors and "clip_g" in tensors:
        parts = {"clip_l": tensors["clip_l"], "clip_g": tensors["clip_g"]}
    elif len(tensors) == 1:
        parts = {"": next(iter(tensors.values()))}
    else:
        raise EaselError(f"{path.name}: not a textual-inversion embedding (it holds {len(tensors)} tensors, "
                         "not one, nor clip_l and clip_g)")
    parts = {k: (v.unsqueeze(0) if v.dim() == 1 else v).detach().to(torch.float32) for k, v in parts.items()}
    counts = {v.shape[0] for v in parts.values()}
    if any(v.dim() != 2 for v in parts.values()) or len(counts) != 1 or not 0 < counts.pop() <= CHUNK_LENGTH:
        raise EaselError(f"{path.name}: not a textual-inversion embedding (its vectors are shaped "
                         f"{', '.join(str(tuple(v.shape)) for v in parts.values())}; up to {CHUNK_LENGTH} vectors fit)")
    return parts


def fitting(parts: dict[str, torch.Tensor], widths: tuple[int, ...]) -> tuple[torch.Tensor, ...] | None:
    """The vectors for each of the model's text encoders (their widths), or None if they do not fit."""
    if len(widths) == 1 and "" in parts and parts[""].shape[1] == widths[0]:
        return (parts[""],)
    if len(widths) == 2 and "clip_l" in parts and (parts["clip_l"].shape[1], parts["clip_g"].shape[1]) == widths:
        return parts["clip_l"], parts["clip_g"]
    return None


class Embeddings:
    """The embedding files of a model library, read once per file version."""

    def __init__(self, library):
        self.library = library
        self._parts: dict[tuple, tuple[dict, str] | None] = {}  # file key -> (vectors, hash); None: unusable
        self._made: dict[tuple, Embedding] = {}  # (file key, widths) -> the Embedding, kept for identity

    def for_encoders(self, text_encoders) -> dict[str, Embedding]:
        """name -> Embedding for every file that fits these text encoders (the first of a name wins)."""
        widths = tuple(int(e.get_input_embeddings().weight.shape[1]) for e in text_encoders)
        found: dict[str, Embedding] = {}
        for entry in self.library.extra_entries(KIND):
            name = PurePosixPath(entry.name).name.rsplit(".", 1)[0]
            if name in found or not entry.path.is_file():
                continue
            stat = entry.path.stat()
            key = (str(entry.path), stat.st_size, stat.st_mtime_ns)
            if key not in self._parts:
                self._parts[key] = self._read(entry.path)
            if self._parts[key] is None:
                continue
            parts, file_hash = self._parts[key]
            if (key, widths) not in self._made:
                vectors = fitting(parts, widths)
                if vectors is None:
                    continue
                self._made[key, widths] = Embedding(name, entry.path, vectors, file_hash)
            found[name] = self._made[key, widths]
        return found

    @staticmethod
    def _read(path: Path):
        try:
            return read_embedding(path), embedding_hash(path)
        except EaselError as error:  # listed with its reason on the Models tab; never fails a job
            logger.warning("embedding skipped: %s", error)
            return None


@contextlib.contextmanager
def embeddings_in_place(encoder, chunks, embeddings: dict[str, Embedding], index: int):
    """While the text encoder runs on `chunks` (one row each, BOS first), its token embedding's
    output gets each fix's vectors (for encoder `index`) in place of the placeholders (A1111's
    EmbeddingsWithFixes). Nothing is hooked when no chunk names an embedding."""
    fixes = [(row, fix) for row, chunk in enumerate(chunks) for fix in chunk.fixes]
    if not fixes:
        yield
        return

    def put_vectors(module, args, output):
        output = output.clone()
        for row, fix in fixes:
            vectors = embeddings[fix.name].vectors[index]
            output[row, 1 + fix.offset:1 + fix.offset + fix.vectors] = vectors.to(output.device, output.dtype)
        return output

    handle = encoder.get_input_embeddings().register_forward_hook(put_vectors)
    try:
        yield
    finally:
        handle.remove()


def model_embeddings(embeddings: Embeddings, loaded) -> dict[str, Embedding]:
    """The embeddings that fit the loaded model, set on its prompt encoder (which drops its cached
    encodings when they changed); returns them."""
    found = embeddings.for_encoders(loaded.encoder.text_encoders)
    loaded.encoder.set_embeddings(found)
    return found


def ti_hashes(used: tuple[str, ...], found: dict[str, Embedding]) -> dict[str, str]:
    """The infotext's `TI hashes` pair for the embeddings a job's prompts used (A1111's format)."""
    pairs = [f"{name.replace(':', '').replace(',', '')}: {found[name].hash}" for name in used if name in found]
    return {"TI hashes": ", ".join(pairs)} if pairs else {}
