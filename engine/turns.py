"""One job on the device at a time, in the order the jobs arrived, whichever door they came in by.

The page's jobs come out of Gradio's queue one by one, the HTTP API's come from uvicorn's worker
threads; both call the Engine, which takes a turn here before it touches a model. A plain lock
(the manager's RLock) makes no promise about who goes next: a steady stream of API calls could keep
a page's job waiting for ever. Tickets served first come, first served can't. No torch here.

The queue also knows the running job and its last progress update, for the API's `progress`.
"""
from __future__ import annotations

import threading
from collections import deque
from contextlib import contextmanager
from typing import Iterator

from engine.errors import CancelledError
from engine.jobs import Job, ProgressUpdate

# A cancel is an Event set from elsewhere, not a notify on our condition: look again this often.
CANCEL_POLL_S = 0.2


class TurnQueue:
    def __init__(self):
        self._changed = threading.Condition()
        self._line: deque[Job] = deque()  # the running job first, then the waiting ones in order
        self._last: ProgressUpdate | None = None

    @contextmanager
    def turn(self, job: Job) -> Iterator[None]:
        """Wait until every job that came before has finished, then hold the device for `job`.
        A job cancelled while it waits leaves the line (CancelledError) without running."""
        with self._changed:
            self._line.append(job)
            try:
                while self._line[0] is not job:
                    if job.cancelled.is_set():
                        raise CancelledError("cancelled while waiting for its turn")
                    self._changed.wait(CANCEL_POLL_S)
            except BaseException:
                self._line.remove(job)
                self._changed.notify_all()
                raise
            self._last = None
        reported = job.on_progress
        job.on_progress = lambda update: self._progress(update, reported)
        try:
            yield
        finally:
            job.on_progress = reported
            with self._changed:
                self._line.popleft()
                self._last = None
                self._changed.notify_all()

    def _progress(self, update: ProgressUpdate, reported) -> None:
        self._last = update
        if reported:
            reported(update)

    def running(self) -> tuple[Job | None, ProgressUpdate | None]:
        """The job holding the device (None when idle) and its latest progress update."""
        with self._changed:
            return (self._line[0] if self._line else None), self._last

    def waiting(self) -> int:
        """Jobs waiting for their turn behind the running one."""
        with self._changed:
            return max(0, len(self._line) - 1)
