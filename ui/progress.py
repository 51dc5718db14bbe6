"""The progress line shown while a job runs: a bar, the step count and the ETA, as small HTML."""
from __future__ import annotations

import html


def format_seconds(seconds: float) -> str:
    seconds = max(0, round(seconds))
    minutes, secs = divmod(seconds, 60)
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def describe(update, unit: str = "Step") -> str:
    """'Step 3/20 · 15% · ETA 12s' (with the batch when there are several) for a ProgressUpdate;
    `unit` names what is counted ("Tile" for the upscalers). An update with a status (the
    job's model being prepared, before its first step) is that status."""
    if getattr(update, "status", ""):
        return update.status
    parts = [f"{unit} {update.step}/{update.steps}"]
    if update.batches > 1:
        parts.append(f"batch {update.batch + 1}/{update.batches}")
    parts.append(f"{round(update.fraction * 100)}%")
    if update.eta is not None:
        parts.append(f"ETA {format_seconds(update.eta)}")
    return " · ".join(parts)


def progress_html(text: str, fraction: float = 0.0, state: str = "running") -> str:
    """state: running, done, cancelled or failed; the page's tests read it from data-state."""
    width = max(0.0, min(1.0, fraction)) * 100
    color = {"cancelled": "#d97706", "failed": "#dc2626"}.get(state, "#2563eb")
    return (
        f'<div class="easel-progress" data-state="{state}">'
        f'<div style="height:8px;background:#e5e7eb;border-radius:4px;overflow:hidden">'
        f'<div style="height:100%;width:{width:.1f}%;background:{color}"></div></div>'
        f'<div class="easel-progress-text">{html.escape(text)}</div></div>'
    )


def preview_every(steps) -> int:
    """A preview every few steps (2 to 8): frequent enough to watch, rare enough to cost little."""
    try:
        steps = int(float(steps))
    except (TypeError, ValueError, OverflowError):  # inf: the request validation refuses it
        return 0
    return max(2, min(8, steps // 5))
