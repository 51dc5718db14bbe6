"""Textual inversions as one of a job's networks: the embeddings that fit the model are given to
its prompt encoder before anything is encoded (engine.embeddings); the infotext's `TI hashes`
names those the prompts really used, so it is made once they are encoded (a late pair)."""
from __future__ import annotations

import contextlib

from engine.embeddings import model_embeddings, ti_hashes
from engine.networks import JobPart


class EmbeddingsKind:
    name = "embeddings"

    def __init__(self, embeddings):
        self.embeddings = embeddings  # engine.embeddings.Embeddings; None: no embeddings folder

    @contextlib.contextmanager
    def for_job(self, run):
        if self.embeddings is None:
            yield None
            return
        found = model_embeddings(self.embeddings, run.model)
        yield JobPart({}, late=lambda job: ti_hashes(job.used_embeddings(), found))
