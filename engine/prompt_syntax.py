"""AUTOMATIC1111 prompt syntax: weights, BREAK and 75-token chunks. Plain text rules, no torch,
so request validation (and the UI) can use them without loading any model code.

Users paste prompts from A1111, so we read them the way A1111 does:
- `(word)` x1.1, `((word))` x1.21, `[word]` /1.1, `(word:1.3)` explicit weight, `\\(` literal bracket;
- `BREAK` ends the current 75-token chunk;
- the token stream is cut into chunks of 75 tokens (77 with BOS/EOS), preferring to cut after the
  last comma when it lies within 20 tokens of the chunk's end, so a phrase is not split in two.

- `<lora:NAME:WEIGHT>` tags (A1111's extra networks) are taken out before any of the above
  (`extract_loras`); the encoder never sees them;
- a textual-inversion embedding's name, as tokens, becomes that embedding's vectors (`chunk_prompt`
  with `embeddings`): the chunking only reserves their places, the encoder fills them in.

Prompt editing (`[a:b:0.5]`), alternation (`[a|b]`) and `AND` are not handled here: their brackets
read as plain emphasis, as in A1111 with those features off.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

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


# A1111's extra-network tag: `<type:args>`, args split on ":" (`<lora:NAME:WEIGHT>`). A1111 takes
# every such tag out of the prompt; "lyco" is its older name for LyCORIS files, loaded as LoRAs.
_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")
LORA_TYPES = ("lora", "lyco")
LORA_WEIGHT_RANGE = (-10.0, 10.0)  # past this a LoRA only turns the image into noise


@dataclass(frozen=True)
class LoraTag:
    """One `<lora:NAME:TE:UNET>` tag: the text encoders' and the UNet's multipliers (A1111: the
    UNet's defaults to the text encoders', which defaults to 1)."""
    name: str
    te_weight: float = 1.0
    unet_weight: float = 1.0


def extract_loras(text: str) -> tuple[str, tuple[LoraTag, ...]]:
    """The prompt without its extra-network tags, and the LoRA tags in order. RequestError-free:
    a tag that does not read raises ValueError with the phrase `lora_problem` reports."""
    tags: list[LoraTag] = []

    def take(match: re.Match) -> str:
        kind, args = match.group(1), match.group(2).split(":")
        if kind not in LORA_TYPES:
            raise ValueError(f"{match.group(0)}: Easel knows only <lora:NAME:WEIGHT> tags, not <{kind}:...>")
        positional = [a for a in args if "=" not in a]
        named = dict(a.split("=", 1) for a in args if "=" in a)
        unknown = sorted(set(named) - {"te", "unet"})
        name = positional[0].strip() if positional else ""
        if not name or unknown or len(positional) > 3:
            raise ValueError(f"{match.group(0)}: a LoRA tag is <lora:NAME>, <lora:NAME:WEIGHT> or "
                             "<lora:NAME:TE_WEIGHT:UNET_WEIGHT> (te=, unet= also work)")
        te = _lora_weight(match.group(0), named.get("te", positional[1] if len(positional) > 1 else "1"))
        unet = _lora_weight(match.group(0), named.get("unet", positional[2] if len(positional) > 2 else str(te)))
        tags.append(LoraTag(name, te, unet))
        return ""

    return _EXTRA_NETWORK.sub(take, text), tuple(tags)


def _lora_weight(tag: str, text: str) -> float:
    low, high = LORA_WEIGHT_RANGE
    weight = _to_float(text.strip())
    if weight is None or not math.isfinite(weight) or not low <= weight <= high:
        raise ValueError(f"{tag}: a LoRA weight must be a number between {low:g} and {high:g}, got {text.strip()!r}")
    return weight


def lora_problem(text: str) -> str | None:
    """Why the prompt's LoRA tags cannot be used (one phrase), or None."""
    try:
        extract_loras(text)
    except ValueError as error:
        return str(error)
    return None


def lora_tag(name: str, weight: float = 1.0) -> str:
    """The tag the page's LoRA picker inserts (A1111's)."""
    return f"<lora:{name}:{weight:g}>"


def add_lora_tag(prompt: str, name: str) -> str:
    """The prompt with `<lora:NAME:1>` appended (after a comma-free space), as A1111's card click does."""
    prompt = prompt.rstrip()
    return f"{prompt} {lora_tag(name)}" if prompt else lora_tag(name)


def _to_float(number: str | None) -> float | None:
    # The pattern admits '1.2.3'; A1111 crashes on it, we read the piece as plain text instead.
    if number is None:
        return None
    try:
        return float(number)
    except ValueError:
        return None


@dataclass(frozen=True)
class EmbeddingFix:
    """An embedding's vectors go at `offset` (0 = the first prompt token, after BOS) in a chunk."""
    offset: int
    name: str
    vectors: int


@dataclass(frozen=True)
class PromptChunk:
    """Up to 75 prompt token ids (no BOS/EOS/padding), one weight per token, and where embeddings'
    vectors replace the placeholder ids."""

    tokens: tuple[int, ...]
    weights: tuple[float, ...]
    fixes: tuple[EmbeddingFix, ...] = ()


# A1111's placeholder id for an embedding's places ("!"); the encoder overwrites their vectors.
EMBEDDING_PLACEHOLDER = 0


def _embedding_lookup(tokenizer, embeddings: Mapping[str, int]) -> dict[int, list[tuple[tuple[int, ...], str]]]:
    """first token id -> [(the name's token ids, name)], longest first, as A1111's find_embedding_at_position."""
    lookup: dict[int, list[tuple[tuple[int, ...], str]]] = {}
    names = list(embeddings)
    if not names:
        return lookup
    for name, ids in zip(names, tokenizer(names, truncation=False, add_special_tokens=False)["input_ids"]):
        if ids:
            lookup.setdefault(ids[0], []).append((tuple(ids), name))
    for candidates in lookup.values():
        candidates.sort(key=lambda c: -len(c[0]))
    return lookup


def chunk_prompt(text: str, tokenizer, *, backtrack: int = COMMA_BACKTRACK,
                 embeddings: Mapping[str, int] | None = None) -> list[PromptChunk]:
    """Tokenize an A1111 prompt into 75-token chunks the way A1111's tokenize_line does.
    `embeddings`: name -> number of vectors; where a name's tokens appear, that many placeholders
    (one chunk, never split: a chunk it does not fit in is closed first) and a fix are recorded."""
    parsed = parse_prompt_attention(text)
    ids = tokenizer([t for t, _ in parsed], truncation=False, add_special_tokens=False)["input_ids"]
    comma = tokenizer.get_vocab().get(",</w>")
    lookup = _embedding_lookup(tokenizer, embeddings or {})

    chunks: list[PromptChunk] = []
    tokens: list[int] = []
    weights: list[float] = []
    fixes: list[EmbeddingFix] = []
    last_comma = -1

    def close() -> None:
        nonlocal tokens, weights, fixes, last_comma
        chunks.append(PromptChunk(tuple(tokens), tuple(weights), tuple(fixes)))
        tokens, weights, fixes, last_comma = [], [], [], -1

    for run_ids, (run_text, weight) in zip(ids, parsed):
        if (run_text, weight) == BREAK:
            close()
            continue
        position = 0
        while position < len(run_ids):
            token = run_ids[position]
            found = next((c for c in lookup.get(token, ()) if tuple(run_ids[position:position + len(c[0])]) == c[0]), None)
            if found is not None:
                size = embeddings[found[1]]
                if len(tokens) + size > CHUNK_LENGTH:
                    close()
                fixes.append(EmbeddingFix(len(tokens), found[1], size))
                tokens.extend([EMBEDDING_PLACEHOLDER] * size)
                weights.extend([weight] * size)
                position += len(found[0])
                continue
            position += 1
            if token == comma:
                last_comma = len(tokens)
            elif len(tokens) == CHUNK_LENGTH and last_comma != -1 and CHUNK_LENGTH - last_comma <= backtrack:
                # Full chunk with a comma near its end: the words after that comma move on to the
                # next chunk together instead of being cut off mid-phrase (an embedding among them
                # moves with its places; A1111 leaves its fix behind, pointing at padding).
                cut = last_comma + 1
                moved = tokens[cut:], weights[cut:], [f for f in fixes if f.offset >= cut]
                del tokens[cut:], weights[cut:]
                fixes = [f for f in fixes if f.offset < cut]
                close()
                tokens, weights = list(moved[0]), list(moved[1])
                fixes = [EmbeddingFix(f.offset - cut, f.name, f.vectors) for f in moved[2]]
            if len(tokens) == CHUNK_LENGTH:
                close()
            tokens.append(token)
            weights.append(weight)

    if tokens or not chunks:
        close()
    return chunks
