"""AUTOMATIC1111 prompt syntax and long, weighted prompt encoding.

Users paste prompts from A1111, so we read them the way A1111 does:
- `(word)` x1.1, `((word))` x1.21, `[word]` /1.1, `(word:1.3)` explicit weight, `\\(` literal bracket;
- `BREAK` ends the current 75-token chunk;
- the token stream is cut into chunks of 75 tokens (77 with BOS/EOS), preferring to cut after the
  last comma when it lies within 20 tokens of the chunk's end, so a phrase is not split in two;
- each chunk is encoded on its own and the chunks are joined along the sequence axis;
- token embeddings are multiplied by their weights and then rescaled so each chunk keeps the mean
  it had before weighting (A1111's "Original" emphasis; without it strong weights wash images out).

Prompt editing (`[a:b:0.5]`), alternation (`[a|b]`), `AND` and textual inversion are not handled
here: their brackets read as plain emphasis, as in A1111 with those features off.
"""
from __future__ import annotations

import math
import re
from collections import OrderedDict
from dataclasses import dataclass

import torch

CHUNK_LENGTH = 75  # prompt tokens per chunk; BOS and EOS make it CLIP's 77
COMMA_BACKTRACK = 20  # A1111's default "comma_padding_backtrack"
ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
BREAK = ("BREAK", -1.0)  # how parse_prompt_attention marks a BREAK, as A1111 does
# The largest effective weight (brackets multiply: 50 nested "(" are x117) a prompt may give a word.
# Past it the weighted embeddings overflow (to inf, then NaN in the image) long before anything useful.
MAX_WEIGHT = 100.0

_ATTENTION_TOKEN = re.compile(
    r"""
      \\[()\[\]\\]                # \( \) \[ \] \\ : the character itself
    | \\                          # any other backslash is dropped, as in A1111
    | [(\[]                       # opening bracket
    | :(?P<weight>[+-]?[.\d]+)\)  # ':1.3)' closes a round bracket with an explicit weight
    | [)\]]                       # closing bracket
    | [^\\()\[\]:]+               # plain text
    | :                           # a colon that is not a weight is plain text
    """,
    re.VERBOSE,
)
_BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split an A1111 prompt into (text, weight) runs; a BREAK keyword becomes ("BREAK", -1.0).

    Unclosed brackets apply their multiplier up to the end of the prompt; stray closing brackets
    are text. Neighbouring runs with equal weights are merged.
    """
    runs: list[list] = []  # [text, weight, is_break]: weights change in place as brackets close
    open_round: list[int] = []
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for run in runs[start:]:
            if not run[2]:  # a BREAK has no weight (A1111 scales its -1 marker; we don't)
                run[1] *= factor

    for match in _ATTENTION_TOKEN.finditer(text):
        piece = match.group(0)
        weight = _to_float(match.group("weight"))
        if piece.startswith("\\"):
            runs.append([piece[1:], 1.0, False])
        elif piece == "(":
            open_round.append(len(runs))
        elif piece == "[":
            open_square.append(len(runs))
        elif weight is not None and open_round:
            scale_from(open_round.pop(), weight)
        elif piece == ")" and open_round:
            scale_from(open_round.pop(), ROUND_MULTIPLIER)
        elif piece == "]" and open_square:
            scale_from(open_square.pop(), SQUARE_MULTIPLIER)
        else:
            for i, part in enumerate(_BREAK_WORD.split(piece)):
                if i > 0:
                    runs.append([BREAK[0], BREAK[1], True])
                runs.append([part, 1.0, False])

    for start in open_round:
        scale_from(start, ROUND_MULTIPLIER)
    for start in open_square:
        scale_from(start, SQUARE_MULTIPLIER)

    merged: list[list] = []
    for run in runs:
        if merged and not run[2] and not merged[-1][2] and merged[-1][1] == run[1]:
            merged[-1][0] += run[0]
        else:
            merged.append(run)
    return [(t, w) for t, w, _ in merged] or [("", 1.0)]


def weight_problem(text: str) -> str | None:
    """Why the prompt's weights cannot be used (one phrase), or None. A weight that overflows
    (`(word:1e400)`, hundreds of nested brackets) or is absurdly large would turn the embeddings
    into inf/NaN; the prompt is at fault, so validation refuses it with this reason."""
    for run_text, weight in parse_prompt_attention(text):
        if (run_text, weight) == BREAK:
            continue
        if not math.isfinite(weight) or abs(weight) > MAX_WEIGHT:
            shown = run_text.strip()[:30]
            return (f"the weight of {shown!r} is {weight:g}; weights (nested brackets multiply) must be "
                    f"between {-MAX_WEIGHT:g} and {MAX_WEIGHT:g}")
    return None


def _to_float(number: str | None) -> float | None:
    # The pattern admits '1.2.3'; A1111 crashes on it, we read the piece as plain text instead.
    if number is None:
        return None
    try:
        return float(number)
    except ValueError:
        return None


@dataclass(frozen=True)
class PromptChunk:
    """Up to 75 prompt token ids (no BOS/EOS/padding) and one weight per token."""

    tokens: tuple[int, ...]
    weights: tuple[float, ...]


def chunk_prompt(text: str, tokenizer, *, backtrack: int = COMMA_BACKTRACK) -> list[PromptChunk]:
    """Tokenize an A1111 prompt into 75-token chunks the way A1111's tokenize_line does."""
    parsed = parse_prompt_attention(text)
    ids = tokenizer([t for t, _ in parsed], truncation=False, add_special_tokens=False)["input_ids"]
    comma = tokenizer.get_vocab().get(",</w>")

    chunks: list[PromptChunk] = []
    tokens: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close() -> None:
        nonlocal tokens, weights, last_comma
        chunks.append(PromptChunk(tuple(tokens), tuple(weights)))
        tokens, weights, last_comma = [], [], -1

    for run_ids, (run_text, weight) in zip(ids, parsed):
        if (run_text, weight) == BREAK:
            close()
            continue
        for token in run_ids:
            if token == comma:
                last_comma = len(tokens)
            elif len(tokens) == CHUNK_LENGTH and last_comma != -1 and CHUNK_LENGTH - last_comma <= backtrack:
                # Full chunk with a comma near its end: the words after that comma move on to the
                # next chunk together instead of being cut off mid-phrase.
                cut = last_comma + 1
                moved = tokens[cut:], weights[cut:]
                del tokens[cut:], weights[cut:]
                close()
                tokens, weights = list(moved[0]), list(moved[1])
            if len(tokens) == CHUNK_LENGTH:
                close()
            tokens.append(token)
            weights.append(weight)

    if tokens or not chunks:
        close()
    return chunks


@dataclass(frozen=True)
class EncodedPrompt:
    """Text conditioning for one prompt. Shared with the cache: treat the tensors as read-only."""

    embeds: torch.Tensor  # [1, 77 * chunks, D]
    pooled: torch.Tensor | None  # SDXL: [1, projection_dim] from encoder 2's first chunk; else None

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
        return EncodedPrompt(torch.cat([encoded.embeds, empty.repeat(1, missing, 1)], dim=1), encoded.pooled)

    @torch.no_grad()
    def _encode_uncached(self, prompt: str) -> EncodedPrompt:
        # Every SD tokenizer shares CLIP's BPE vocabulary, so the chunks are the same for both
        # SDXL encoders; only BOS/EOS/padding ids are taken from each tokenizer.
        chunks = chunk_prompt(prompt, self.tokenizers[0])
        weights = torch.tensor(
            [[1.0, *c.weights] + [1.0] * (CHUNK_LENGTH + 1 - len(c.weights)) for c in chunks],
            dtype=torch.float32, device=self.device,
        )
        parts, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            ids = torch.tensor([_chunk_ids(c, tokenizer) for c in chunks], dtype=torch.long, device=self.device)
            out = encoder(ids, output_hidden_states=self.sdxl)
            hidden = out.hidden_states[-2] if self.sdxl else out.last_hidden_state
            parts.append(_apply_weights(hidden, weights))
            if self.sdxl and hasattr(out, "text_embeds"):
                pooled = out.text_embeds[:1].to(device=self.device, dtype=self.dtype)
        embeds = torch.cat(parts, dim=-1)  # [chunks, 77, D]
        embeds = embeds.reshape(1, -1, embeds.shape[-1]).to(device=self.device, dtype=self.dtype)
        return EncodedPrompt(embeds, pooled)


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
