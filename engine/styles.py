"""Prompt styles, as AUTOMATIC1111 keeps them: `styles.csv` in the data folder, with the header
`name,prompt,negative_prompt` (csv module, UTF-8 with or without a BOM; "text" is an old name
for the prompt column).

Applying a style: where its prompt holds `{prompt}`, the user's prompt goes there; otherwise the
style's text is appended after the prompt, joined by ", " (empty parts left out). The negative
prompt likewise. Several styles apply in the order given, each to the result of the last.

A file that does not read as styles gives no styles and a warning in the log, never an error;
saving over such a file is refused, so nothing in it is lost. Saving or deleting rewrites the
whole file atomically (engine/atomic.py), keeping the other rows, their extra columns and the
header's column order. No torch here.
"""
from __future__ import annotations

import csv
import io
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from engine.atomic import write_atomic
from engine.errors import EaselError, RequestError

logger = logging.getLogger(__name__)

STYLES_FILE = "styles.csv"
COLUMNS = ("name", "prompt", "negative_prompt")
MAX_NAME_CHARS = 100
MAX_STYLE_CHARS = 20000  # as a prompt (engine.request.MAX_PROMPT_CHARS)
MAX_STYLES_APPLIED = 50
PLACEHOLDER = "{prompt}"


@dataclass(frozen=True)
class Style:
    name: str
    prompt: str = ""
    negative_prompt: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "prompt": self.prompt, "negative_prompt": self.negative_prompt}


def merge_prompt(style_text: str, prompt: str) -> str:
    """One style's text applied to a prompt (A1111's merge_prompts)."""
    if PLACEHOLDER in style_text:
        return style_text.replace(PLACEHOLDER, prompt)
    return ", ".join(part for part in (prompt.strip(), style_text.strip()) if part)


def check_name(name: Any, field: str = "style") -> str:
    """A style's name: text, 1 to MAX_NAME_CHARS printable characters once stripped."""
    if not isinstance(name, str):
        raise RequestError(field, f"a style name must be text, got {type(name).__name__}")
    name = name.strip()
    if not name:
        raise RequestError(field, "give the style a name")
    if len(name) > MAX_NAME_CHARS:
        raise RequestError(field, f"a style name is at most {MAX_NAME_CHARS} characters, got {len(name)}")
    if not name.isprintable():
        raise RequestError(field, "a style name must be printable characters only (no tabs, newlines or controls)")
    return name


def _check_text(field: str, value: Any) -> str:
    value = "" if value is None else value
    if not isinstance(value, str):
        raise RequestError(field, f"must be text, got {type(value).__name__}")
    if len(value) > MAX_STYLE_CHARS:
        raise RequestError(field, f"is {len(value)} characters long; at most {MAX_STYLE_CHARS} are allowed")
    if any(not (c.isprintable() or c in "\t\n") for c in value.replace("\r\n", "\n")):
        raise RequestError(field, "contains a control character; only tab and newline are allowed")
    return value.replace("\r\n", "\n")


@dataclass
class _Table:
    """The file as read: its header (column order), rows (extra columns kept) and BOM."""
    fieldnames: list[str]
    rows: list[dict[str, str]]
    bom: bool = False
    problem: str | None = None  # why the file could not be read; then it is never written over


class Styles:
    """The styles in one styles.csv. Read on each call (the file is small and may be edited by hand
    while Easel runs); writes are serialised within this process."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()

    # --- reading --------------------------------------------------------------------------------
    def _read(self) -> _Table:
        if not self.path.is_file():
            return _Table(list(COLUMNS), [])
        try:
            raw = self.path.read_bytes()
            text = raw.decode("utf-8-sig")
            reader = csv.DictReader(io.StringIO(text, newline=""), skipinitialspace=True, strict=True)
            fieldnames = [f for f in (reader.fieldnames or [])]
            if "name" not in fieldnames:
                raise ValueError(f"its first line must be the header name,prompt,negative_prompt, "
                                 f"not {','.join(fieldnames)!r}")
            rows = [{k: v for k, v in row.items() if k is not None} for row in reader]
        except (OSError, UnicodeDecodeError, csv.Error, ValueError) as e:
            logger.warning("prompt styles: %s is not read (%s)", self.path, e)
            return _Table(list(COLUMNS), [], problem=str(e).splitlines()[0] if str(e) else type(e).__name__)
        return _Table(fieldnames, rows, bom=raw.startswith(b"\xef\xbb\xbf"))

    @staticmethod
    def _style(row: dict[str, str]) -> Style | None:
        name = (row.get("name") or "").strip()
        if not name:
            return None
        prompt = row.get("prompt") if "prompt" in row else row.get("text")
        return Style(name, prompt or "", row.get("negative_prompt") or "")

    def all(self) -> list[Style]:
        """The styles in file order (rows without a name left out; a repeated name: the first)."""
        found: dict[str, Style] = {}
        for row in self._read().rows:
            style = self._style(row)
            if style is not None and style.name not in found:
                found[style.name] = style
        return list(found.values())

    def names(self) -> list[str]:
        return [s.name for s in self.all()]

    def apply(self, prompt: str, negative_prompt: str, names: Iterable[str] | None) -> tuple[str, str]:
        """The prompt and negative prompt with the named styles applied in order. RequestError
        naming `styles` for a name that is not a style, or a value that is not a list of names."""
        if names is None:
            return prompt, negative_prompt
        if isinstance(names, (str, bytes)) or not isinstance(names, (list, tuple)):
            raise RequestError("styles", f"must be a list of style names, got {type(names).__name__}")
        if len(names) > MAX_STYLES_APPLIED:
            raise RequestError("styles", f"at most {MAX_STYLES_APPLIED} styles at once, got {len(names)}")
        if not names:
            return prompt, negative_prompt
        known = {s.name: s for s in self.all()}
        for name in names:
            if not isinstance(name, str) or name.strip() not in known:
                shown = name if isinstance(name, str) else type(name).__name__
                listed = ", ".join(sorted(known)[:20]) or f"none yet: {self.path.name} holds no styles"
                raise RequestError("styles", f"no style named {shown[:MAX_NAME_CHARS]!r} (styles: {listed})")
        prompt, negative_prompt = prompt or "", negative_prompt or ""
        for name in names:
            style = known[name.strip()]
            prompt = merge_prompt(style.prompt, prompt)
            negative_prompt = merge_prompt(style.negative_prompt, negative_prompt)
        return prompt, negative_prompt

    # --- writing --------------------------------------------------------------------------------
    def save(self, name: str, prompt: str, negative_prompt: str) -> Style:
        """Add a style, or overwrite the one of that name (in its place); the others are kept."""
        style = Style(check_name(name), _check_text("prompt", prompt), _check_text("negative_prompt", negative_prompt))
        with self._lock:
            table = self._writable()
            prompt_column = "prompt" if "prompt" in table.fieldnames or "text" not in table.fieldnames else "text"
            for column in ("name", prompt_column, "negative_prompt"):
                if column not in table.fieldnames:
                    table.fieldnames.append(column)
            values = {"name": style.name, prompt_column: style.prompt, "negative_prompt": style.negative_prompt}
            for row in table.rows:
                if (row.get("name") or "").strip() == style.name:
                    row.update(values)
                    break
            else:
                table.rows.append(values)
            self._write(table)
        return style

    def delete(self, name: str) -> None:
        """Remove a style (RequestError naming `style` when there is none of that name)."""
        name = check_name(name)
        with self._lock:
            table = self._writable()
            kept = [row for row in table.rows if (row.get("name") or "").strip() != name]
            if len(kept) == len(table.rows):
                raise RequestError("style", f"no style named {name!r} to delete")
            table.rows = kept
            self._write(table)

    def _writable(self) -> _Table:
        table = self._read()
        if table.problem is not None:
            raise EaselError(f"styles: {self.path} cannot be read ({table.problem}); fix or move it before "
                             "saving styles, so nothing in it is lost")
        return table

    def _write(self, table: _Table) -> None:
        out = io.StringIO(newline="")
        writer = csv.DictWriter(out, fieldnames=table.fieldnames, extrasaction="ignore", lineterminator="\r\n")
        writer.writeheader()
        writer.writerows(table.rows)
        data = out.getvalue().encode("utf-8")
        try:
            write_atomic(self.path, (b"\xef\xbb\xbf" if table.bom else b"") + data)
        except OSError as e:
            raise EaselError(f"styles: cannot write {self.path}: {e.strerror or e}") from None
