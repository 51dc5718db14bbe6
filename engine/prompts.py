"""Long, weighted prompt encoding (the syntax itself is `engine.prompt_syntax`).

- each 75-token chunk is encoded on its own and the chunks are joined along the sequence axis;
- token embeddings are multiplied by their weights and then rescaled so each chunk keeps the mean
  it had before weighting (A1111's "Original" emphasis; without it strong weights wash images out);
- a textual-inversion embedding's name in the prompt puts its vectors in place of the name's
  tokens, at the encoder's input (`engine.embeddings`), as A1111 does.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from engine.embeddings import Embedding, embeddings_in_place
from engine.prompt_syntax import (  # noqa: F401 - BREAK, parse_prompt_attention: re-exported for callers
    BREAK,
    CHUNK_LENGTH,
    PromptChunk,
    chunk_prompt,
    parse_prompt_attention,
)


@dataclass(frozen=True)
class EncodedPrompt:
    """Text conditioning for one prompt. Shared with the cache: treat the tensors as read-only."""

    embeds: torch.Tensor  # [1, 77 * chunks, D]
    pooled: torch.Tensor | None  # SDXL: [1, projection_dim] from encoder 2's first chunk; else None
    embeddings: tuple[str, ...] = ()  # the textual-inversion embeddings the prompt used, by name

    @property
    def chunks(self) -> int:
        return self.embeds.shape[1] // (CHUNK_LENGTH + 2)


class PromptEncoder:
    """Encodes A1111-style prompts with a pipeline's tokenizers and text encoders.

    One encoder (SD 1.x/2.x): the encoder's last_hidden_state. Two encoders (SDXL): each one's
    penultimate hidden state joined on the feature axis, plus encoder 2's projected pooled output,
    as diffusers' SDXL pipeline does.
    """

    def __init__(
        self,
        tokenizers: list,
        text_encoders: list,
        *,
        device: torch.device,
        dtype: torch.dtype,
        cache_size: int = 16,
        zero_empty_negative: bool = False,
    ):
        if len(tokenizers) != len(text_encoders) or len(text_encoders) not in (1, 2):
            raise ValueError("PromptEncoder takes one or two tokenizer/text encoder pairs")
        self.tokenizers = list(tokenizers)
        self.text_encoders = list(text_encoders)
        self.device = torch.device(device)
        self.dtype = dtype
        self.cache_size = cache_size
        # SDXL base (diffusers' force_zeros_for_empty_prompt, A1111 likewise) conditions an empty
        # negative prompt on zeros rather than on the encoding of "".
        self.zero_empty_negative = zero_empty_negative
        self.sdxl = len(text_encoders) == 2
        if self.sdxl and not hasattr(text_encoders[1], "text_projection"):
            raise ValueError("SDXL's second text encoder must be a CLIPTextModelWithProjection")
        self._cache: OrderedDict[str, EncodedPrompt] = OrderedDict()
        self.embeddings: dict[str, Embedding] = {}  # name -> textual inversion, for these encoders
        self.clip_skip = 1  # set_clip_skip

    def set_clip_skip(self, clip_skip: int) -> bool:
        """A1111's CLIP skip (CLIP_stop_at_last_layers): 1 is the last layer, 2 the one before it,
        each put through the encoder's final layer norm, as A1111 does for SD 1.x. SD 2.x and SDXL
        keep their own layer (A1111 ignores the setting for them too). True when it applies here."""
        applies = not self.sdxl and clip_skip > 1 and _final_layer_norm(self.text_encoders[0]) is not None
        wanted = clip_skip if applies else 1
        if wanted != self.clip_skip:
            self.clip_skip = wanted
            self.clear_cache()
        return applies

    def set_embeddings(self, embeddings: dict[str, Embedding]) -> None:
        """The textual-inversion embeddings prompts may name; encodings made without them are dropped."""
        if embeddings != self.embeddings:
            self.embeddings = dict(embeddings)
            self.clear_cache()

    def clear_cache(self) -> None:
        """Forget cached encodings: the text encoders' weights changed (a LoRA came or went)."""
        self._cache.clear()

    def encode(self, prompt: str) -> EncodedPrompt:
        cached = self._cache.get(prompt)
        if cached is not None:
            self._cache.move_to_end(prompt)
            return cached
        encoded = self._encode_uncached(prompt)
        if self.cache_size > 0:
            self._cache[prompt] = encoded
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return encoded

    def encode_pair(self, prompt: str, negative: str) -> tuple[EncodedPrompt, EncodedPrompt]:
        """Prompt and negative prompt with the same number of chunks, so CFG can batch them."""
        positive = self.encode(prompt)
        if self.zero_empty_negative and negative == "":
            pooled = None if positive.pooled is None else torch.zeros_like(positive.pooled)
            return positive, EncodedPrompt(torch.zeros_like(positive.embeds), pooled)
        negative_enc = self.encode(negative)
        chunks = max(positive.chunks, negative_enc.chunks)
        return self._pad(positive, chunks), self._pad(negative_enc, chunks)

    def _pad(self, encoded: EncodedPrompt, chunks: int) -> EncodedPrompt:
        # A1111 pads with the encoding of the empty prompt, one 77-token block per missing chunk.
        missing = chunks - encoded.chunks
        if missing <= 0:
            return encoded
        empty = self.encode("").embeds
        return EncodedPrompt(torch.cat([encoded.embeds, empty.repeat(1, missing, 1)], dim=1), encoded.pooled,
                             encoded.embeddings)

    @torch.no_grad()
    def _encode_uncached(self, prompt: str) -> EncodedPrompt:
        # Every SD tokenizer shares CLIP's BPE vocabulary, so the chunks are the same for both
        # SDXL encoders; only BOS/EOS/padding ids are taken from each tokenizer.
        chunks = chunk_prompt(prompt, self.tokenizers[0],
                              embeddings={name: e.count for name, e in self.embeddings.items()})
        weights = torch.tensor(
            [[1.0, *c.weights] + [1.0] * (CHUNK_LENGTH + 1 - len(c.weights)) for c in chunks],
            dtype=torch.float32, device=self.device,
        )
        parts, pooled = [], None
        for index, (tokenizer, encoder) in enumerate(zip(self.tokenizers, self.text_encoders)):
            ids = torch.tensor([_chunk_ids(c, tokenizer) for c in chunks], dtype=torch.long, device=self.device)
            with embeddings_in_place(encoder, chunks, self.embeddings, index):
                hidden, out = self._hidden(encoder, ids)
            parts.append(_apply_weights(hidden, weights))
            if self.sdxl and hasattr(out, "text_embeds"):
                pooled = out.text_embeds[:1].to(device=self.device, dtype=self.dtype)
        embeds = torch.cat(parts, dim=-1)  # [chunks, 77, D]
        embeds = embeds.reshape(1, -1, embeds.shape[-1]).to(device=self.device, dtype=self.dtype)
        used = tuple(dict.fromkeys(fix.name for chunk in chunks for fix in chunk.fixes))
        return EncodedPrompt(embeds, pooled, used)


    def _hidden(self, encoder, ids: torch.Tensor):
        """The encoder's conditioning (and its whole output): SDXL's penultimate layer; else the
        last layer, or with CLIP skip n the n-th from the end through the final layer norm."""
        if self.sdxl:
            out = encoder(ids, output_hidden_states=True)
            return out.hidden_states[-2], out
        if self.clip_skip == 1:
            out = encoder(ids)
            return out.last_hidden_state, out
        skip = min(self.clip_skip, encoder.config.num_hidden_layers)  # A1111's 12 on a shallower encoder: its first
        if skip > 2 and getattr(encoder, "_diffusers_hook", None) is not None:
            # A compiled (OpenVINO) encoder hands back its last two layers only: this one runs on torch.
            from engine.openvino_parts import parts_on_torch

            with parts_on_torch(encoder):
                out = encoder(ids, output_hidden_states=True)
        else:
            out = encoder(ids, output_hidden_states=True)
        return _final_layer_norm(encoder)(out.hidden_states[-skip]), out


def _final_layer_norm(encoder) -> torch.nn.Module | None:
    """A CLIP text model's final layer norm: transformers 5 keeps it on the model, 4 on its text_model."""
    inner = getattr(encoder, "text_model", encoder)
    return getattr(inner, "final_layer_norm", None)


def _chunk_ids(chunk: PromptChunk, tokenizer) -> list[int]:
    padding = [tokenizer.pad_token_id] * (CHUNK_LENGTH - len(chunk.tokens))
    return [tokenizer.bos_token_id, *chunk.tokens, tokenizer.eos_token_id, *padding]


def _apply_weights(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """z *= weights, then rescale each chunk back to its original mean (A1111 'Original')."""
    if bool((weights == 1.0).all()):
        return hidden  # nothing to weight: keep the encoder's output bit for bit
    z = hidden.float()
    original_mean = z.mean(dim=(1, 2), keepdim=True)
    z = z * weights.to(z.device).unsqueeze(-1)
    new_mean = z.mean(dim=(1, 2), keepdim=True)
    # A1111 divides unguarded; a chunk whose weighted mean is exactly 0 would turn into NaNs.
    z = z * torch.where(new_mean == 0, 1.0, original_mean / new_mean)
    return z.to(hidden.dtype)
