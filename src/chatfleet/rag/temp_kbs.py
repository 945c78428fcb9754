"""Temporary knowledge bases, for Chatchat's file chat: upload files, chat with them, they expire.

Chatchat keeps them in its process's memory (10 at most, least recently used dropped), so a file
chat works only against the replica that took the upload. ChatFleet keeps them in the knowledge
store like any knowledge base, under a name no client can give (``.temp-<id>``: knowledge-base
names may not start with a dot, ``rag/names.py``), so every replica sharing a pgvector store
serves them; the id a client gets is the 32 hex digits after the prefix. They are hidden from
listings, expire ``kb.temp_ttl_s`` after their upload (``sweep``, run periodically by the
knowledge service, and a check on every use), and at most ``kb.max_temp_kbs`` are kept: past it,
an upload that stored something deletes the oldest (by upload time, not last use; Chatchat drops
its least recently used). With API keys on, only key holders can upload at all.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Callable

from chatfleet.rag.stores.base import (
    KnowledgeBaseExists,
    KnowledgeBaseNotFound,
    KnowledgeBaseRecord,
    KnowledgeStore,
)

__all__ = ["TEMP_PREFIX", "TempKbNotFound", "TempKnowledgeBases", "is_temp_kb"]

log = logging.getLogger(__name__)

TEMP_PREFIX = ".temp-"
_ID = re.compile(r"[0-9a-f]{32}")
_MIN_SWEEP_S = 0.5
"""Shortest time between two sweeps, whatever the time to live."""


def is_temp_kb(name: str) -> bool:
    """Whether a store's knowledge base is a temporary one (listings leave those out)."""
    return name.startswith(TEMP_PREFIX)


class TempKbNotFound(LookupError):
    def __init__(self, temp_id: str, ttl_s: float) -> None:
        super().__init__(
            f"temporary knowledge base '{temp_id[:40]}' does not exist: it expired (they are "
            f"kept {ttl_s:g} s after their upload, kb.temp_ttl_s), it was among the oldest when "
            "more than kb.max_temp_kbs were uploaded, or the id is wrong; upload the files "
            "again with /knowledge_base/upload_temp_docs and chat with the new id")
        self.temp_id = temp_id


class TempKnowledgeBases:
    def __init__(self, store: KnowledgeStore, *, ttl_s: float, max_count: int,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self.max_count = max_count
        self._clock = clock

    def _expired(self, record: KnowledgeBaseRecord) -> bool:
        return self._clock() - record.created_at >= self.ttl_s

    async def create(self, embed_model: str, *, prev_id: str | None = None) -> tuple[str, str]:
        """A new, empty temporary knowledge base: its id and its store name. With ``prev_id``
        of one that exists, that one is emptied and its id kept (Chatchat's ``prev_id``); an
        id that names none gets a new one, so a client cannot choose its id."""
        if prev_id is not None and _ID.fullmatch(prev_id) and \
                await self.store.get_kb(TEMP_PREFIX + prev_id) is not None:
            await self._delete(TEMP_PREFIX + prev_id)
            temp_id = prev_id
        else:
            temp_id = uuid.uuid4().hex
        name = TEMP_PREFIX + temp_id
        try:
            await self.store.create_kb(name, info="temporary (file chat)",
                                       embed_model=embed_model)
        except KnowledgeBaseExists:
            pass  # a concurrent upload with the same prev_id recreated it first: share it
        return temp_id, name

    async def enforce_bound(self) -> None:
        """After an upload: delete the expired ones, then the oldest beyond ``max_count``. Run
        once the upload stored something, so a failed one never costs anyone theirs."""
        await self.sweep()
        await self._evict(keep=self.max_count)

    async def resolve(self, temp_id: str) -> str:
        """The store name of a live temporary knowledge base. Raises ``TempKbNotFound``."""
        if not _ID.fullmatch(temp_id):
            raise TempKbNotFound(temp_id, self.ttl_s)
        name = TEMP_PREFIX + temp_id
        record = await self.store.get_kb(name)
        if record is None:
            raise TempKbNotFound(temp_id, self.ttl_s)
        if self._expired(record):
            await self._delete(name)
            raise TempKbNotFound(temp_id, self.ttl_s)
        return name

    async def delete(self, name: str) -> None:
        """Remove one (an upload that stored nothing)."""
        await self._delete(name)

    async def sweep(self) -> int:
        """Delete the expired ones; how many went."""
        expired = [kb.name for kb in await self._temp_kbs() if self._expired(kb)]
        for name in expired:
            await self._delete(name)
        return len(expired)

    async def run_sweeper(self) -> None:
        """Sweep every quarter of the time to live, at least ``_MIN_SWEEP_S`` and at most a
        minute apart, until cancelled. (The floor keeps a tiny ``kb.temp_ttl_s`` from spinning
        the sweeper; an expired one is refused on use however late the sweep comes.)"""
        interval = min(max(self.ttl_s / 4, _MIN_SWEEP_S), 60.0)
        while True:
            await asyncio.sleep(interval)
            try:
                if swept := await self.sweep():
                    log.info("deleted %d expired temporary knowledge base(s)", swept)
            except Exception:  # a store outage must not end the sweeper; the next round retries
                log.exception("sweeping expired temporary knowledge bases failed")

    async def _temp_kbs(self) -> list[KnowledgeBaseRecord]:
        return [kb for kb in await self.store.list_kbs() if is_temp_kb(kb.name)]

    async def _evict(self, *, keep: int) -> None:
        """Delete the oldest until at most ``keep`` remain."""
        temp = sorted(await self._temp_kbs(), key=lambda kb: kb.created_at)
        for kb in temp[:max(0, len(temp) - keep)]:
            # Without its name: the id in it is all that guards the uploaded text.
            log.info("deleted a temporary knowledge base uploaded %.0f s ago early: "
                     "kb.max_temp_kbs (%d) reached", self._clock() - kb.created_at, self.max_count)
            await self._delete(kb.name)

    async def _delete(self, name: str) -> None:
        try:
            await self.store.delete_kb(name)
        except KnowledgeBaseNotFound:
            pass  # another replica's sweep, or a concurrent request, was first
