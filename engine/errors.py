"""Errors that reach a user. Each carries a one-line message fit to show as-is."""
from __future__ import annotations


class EaselError(Exception):
    """A failure the user can understand and act on; str(e) is one line, no traceback needed.

    A lone UTF-16 surrogate in the message (a value echoed from JSON's "\\ud800" or from argv's
    surrogateescape) is written as the escape `\\ud800`: such a message could not be encoded
    (a JSON answer, a terminal, a log) and would turn a refusal into a crash."""

    def __init__(self, *args):
        super().__init__(*(_encodable(a) if isinstance(a, str) else a for a in args))


def _encodable(text: str) -> str:
    if text.isascii():
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class RequestError(EaselError, ValueError):
    """Bad input: names the field and what is allowed."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


class UnknownCheckpointError(EaselError):
    """A checkpoint whose family cannot be identified. Never guessed."""


class UnsafeCheckpointError(EaselError):
    """A pickle checkpoint that needs more than plain tensors to load. Its code never runs."""


class ModelNotFoundError(EaselError):
    """A model name that does not resolve inside the models folder."""


class CancelledError(EaselError):
    """The user cancelled the job."""
