"""AUTOMATIC1111 prompt syntax: weights, BREAK and 75-token chunks. Plain text rules, no torch,
so request validation (and the UI) can use them without loading any model code.

Users paste prompts from A1111, so we read them the way A1111 does:
- `(word)` x1.1, `((word))` x1.21, `[word]` /1.1, `(word:1.3)` explicit weight, `\\(` literal bracket;
- `BREAK` ends the current 75-token chunk;
- the token stream is cut into chunks of 75 tokens (77 with BOS/EOS), preferring to cut after the
  last comma when it lies within 20 tokens of the chunk's end, so a phrase is not split in two.

Prompt editing (`[a:b:0.5]`), alternation (`[a|b]`), `AND` and textual inversion are not handled
here: their brackets read as plain emphasis, as in A1111 with those features off.
"""
from __future__ import annotations

import math
import re
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
