"""CLIP tokenizers built offline from the BPE vocabulary that open_clip_torch ships.

Every SD family uses the same CLIP BPE (49408 tokens). open_clip ships it as
`bpe_simple_vocab_16e6.txt.gz`; we turn it into the `vocab.json` + `merges.txt` pair that
transformers' CLIPTokenizer reads, once, into a cache folder. No hub access, ever.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
from pathlib import Path

from engine.atomic import write_atomic
from engine import compat  # noqa: F401 - torchvision shim before transformers/diffusers

BPE_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
MODEL_MAX_LENGTH = 77
# SD 1.x and SDXL's first encoder pad with <|endoftext|>; the OpenCLIP towers (SD 2.x and SDXL's
# second encoder) were trained padding with "!" (token 0). Getting this wrong changes every image.
PAD_TOKENS = {"clip-l": "<|endoftext|>", "open-clip": "!"}


def find_bpe_vocab() -> Path:
    # find_spec locates the package without importing it (importing open_clip pulls in timm).
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise RuntimeError("open_clip_torch is not installed: it ships the CLIP vocabulary Easel needs")
    path = Path(spec.origin).parent / BPE_FILE_NAME
    if not path.is_file():
        raise RuntimeError(f"open_clip_torch is installed but {path} is missing")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP's reversible byte -> printable character table.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def _vocab_and_merges(bpe_path: Path) -> tuple[dict[str, int], list[str]]:
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = lines[1 : VOCAB_SIZE - 256 * 2 - 2 + 1]
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    tokens += ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    if len(tokens) != VOCAB_SIZE:
        raise RuntimeError(f"{bpe_path}: expected {VOCAB_SIZE} tokens, built {len(tokens)}")
    return {t: i for i, t in enumerate(tokens)}, merges


def write_tokenizer_files(dest: Path, kind: str = "clip-l") -> Path:
    """Write a complete CLIPTokenizer folder for `kind` ('clip-l' or 'open-clip') into dest."""
    dest.mkdir(parents=True, exist_ok=True)
    vocab, merges = _vocab_and_merges(find_bpe_vocab())
    write_atomic(dest / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    write_atomic(dest / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": PAD_TOKENS[kind],
        "do_lower_case": True,
    }
    write_atomic(dest / "tokenizer_config.json", json.dumps(config, indent=1))
    return dest


def default_cache_dir() -> Path:
    return Path(os.environ.get("EASEL_CACHE", Path.home() / ".cache" / "easel"))


def tokenizer_dir(kind: str = "clip-l", cache_dir: Path | None = None) -> Path:
    """A ready tokenizer folder for `kind`, built on first use and reused afterwards."""
    folder = (cache_dir or default_cache_dir()) / "tokenizers" / kind
    if not (folder / "tokenizer_config.json").is_file():
        write_tokenizer_files(folder, kind)
    return folder


def load_clip_tokenizer(kind: str = "clip-l"):
    from transformers import CLIPTokenizer

    # from_pretrained(folder) - not CLIPTokenizer(vocab_file=...), which in transformers 5 builds
    # an empty two-token tokenizer without complaint.
    tok = CLIPTokenizer.from_pretrained(str(tokenizer_dir(kind)), local_files_only=True)
    tok.model_max_length = MODEL_MAX_LENGTH
    return tok
