"""UI settings that outlive a restart: last model, output folder, watermark on/off.

Stored as `<data_dir>/settings.json`, written atomically (temp file + rename) so a crash while
saving never leaves a half-written file. An unreadable file is treated as empty, not fatal.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from engine.atomic import write_atomic


@dataclass(frozen=True)
class UISettings:
    last_model: str | None = None
    outdir: str | None = None       # None: the command line's --outdir
    watermark: bool | None = None   # None: the command line's choice


class SettingsStore:
    def __init__(self, path: Path):
        self.path = Path(path)

    def load(self) -> UISettings:
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return UISettings()
        if not isinstance(raw, dict):
            return UISettings()
        known = {f.name for f in fields(UISettings)}
        return UISettings(**{k: v for k, v in raw.items() if k in known})

    def save(self, settings: UISettings) -> None:
        write_atomic(self.path, json.dumps(asdict(settings), indent=2))

    def update(self, **changes) -> UISettings:
        settings = replace(self.load(), **changes)
        self.save(settings)
        return settings
