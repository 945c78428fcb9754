"""Chatchat 0.3.1.3's answer shapes, for its chat routes.

Knowledge-base chat (its ``OpenAIChatOutput``): a series of ``chat.completion.chunk`` objects,
each with a new id (``chat<uuid4>``), Chatchat's extra fields (status, message_type, message_id,
is_ref) and ``choices: [{"delta": {"content", "tool_calls"}, "role"}]``, opening with a chunk of
empty content carrying ``docs`` (the references); no ``[DONE]``. Every chunk has ``status:
null``, which is what its WebUI shows as the answer. Whole, one ``chat.completion`` object
(Chatchat's kb_chat sent it JSON-encoded as a string; ChatFleet sends the object, on purpose).

File chat (/chat/file_chat): ``{"answer": token}`` objects, then ``{"docs": [...]}``.

Plain chat (/chat/chat/completions): Chatchat relays the upstream's OpenAI objects with
``message_id`` and ``status`` added (checked against a running Chatchat 0.3.1.3), no ``[DONE]``.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from chatfleet.engines.base import Usage
from chatfleet.serving.openai_format import StreamFormatter

_RELAY_FIELDS = {"message_id": None, "status": None}
"""What Chatchat's plain chat adds to the upstream's OpenAI objects (chat_routes.py)."""

__all__ = ["ChatchatChunkFormatter", "ChatchatRelayFormatter", "FileChatFormatter",
           "chatchat_completion", "chatchat_relay_completion"]

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


_MESSAGE_FIELDS = '"status":null,"message_type":1,"message_id":null,"is_ref":false'


def chatchat_completion(*, model: str, content: str, finish_reason: str | None,
                        extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A whole (non-streamed) answer as Chatchat's ``chat.completion`` object."""
    return {"id": f"chat{uuid.uuid4()}", "object": "chat.completion", "model": model,
            "created": int(time.time()), "status": None, "message_type": 1, "message_id": None,
            "is_ref": False, **(extra or {}),
            "choices": [{"message": {"role": "assistant", "content": content,
                                     "finish_reason": finish_reason, "tool_calls": []}}]}


class ChatchatChunkFormatter:
    """Renders one streamed Chatchat knowledge-base answer (implements ``ChunkFormatter``).

    ``docs``: the reference strings, sent on the first chunk. ``extra`` fields go on the first
    chunk too (ChatFleet adds ``retrieval``: its mode, time and hits).
    """

    __slots__ = ("_created", "_docs", "_extra", "_model")

    def __init__(self, *, model: str, docs: list[str],
                 extra: dict[str, Any] | None = None) -> None:
        self._model = _dumps(model)
        self._created = int(time.time())
        self._docs = docs
        self._extra = extra or {}

    def _chunk(self, content: str, more: str = "") -> str:
        return (f'{{"id":"chat{uuid.uuid4()}","object":"chat.completion.chunk","model":'
                f'{self._model},"created":{self._created},{_MESSAGE_FIELDS}{more},'
                f'"choices":[{{"delta":{{"content":{_dumps(content)},"tool_calls":[]}},'
                '"role":"assistant"}]}')

    def first(self) -> str:
        more = "".join(f",{_dumps(k)}:{_dumps(v)}" for k, v in self._extra.items())
        return self._chunk("", f',"docs":{_dumps(self._docs)}{more}')

    def token(self, text: str) -> str:
        return self._chunk(text)

    def finish(self, finish_reason: str) -> None:
        return None

    def usage(self, usage: Usage | None) -> None:
        return None

    def done(self) -> None:
        return None

    def error(self, message: str, *, error_type: str, code: int,
              retry_after_s: float | None = None) -> str:
        """An error as a chunk whose content is the message (what its WebUI shows) with
        Chatchat's ``error`` field beside it."""
        more = f',"error":{_dumps(message)},"code":{code},"error_type":{_dumps(error_type)}'
        if retry_after_s is not None:
            more += f',"retry_after":{retry_after_s}'
        return self._chunk(message, more)


class FileChatFormatter:
    """Renders one streamed file-chat answer (Chatchat's /chat/file_chat; implements
    ``ChunkFormatter``): ``{"answer": <token>}`` per token, then ``{"docs": [...]}`` last, as
    Chatchat sends them; an error as ``{"code", "msg"}``, what its clients check."""

    __slots__ = ("_docs",)

    def __init__(self, *, docs: list[str]) -> None:
        self._docs = docs

    def first(self) -> None:
        return None

    def token(self, text: str) -> str:
        return _dumps({"answer": text})

    def finish(self, finish_reason: str) -> None:
        return None

    def usage(self, usage: Usage | None) -> None:
        return None

    def done(self) -> str:
        return _dumps({"docs": self._docs})

    def error(self, message: str, *, error_type: str, code: int,
              retry_after_s: float | None = None) -> str:
        error: dict[str, Any] = {"code": code, "msg": message, "error_type": error_type}
        if retry_after_s is not None:
            error["retry_after"] = retry_after_s
        return _dumps(error)


class ChatchatRelayFormatter(StreamFormatter):
    """Chatchat's plain chat (/chat/chat/completions): it relays the upstream's OpenAI chunks with
    ``message_id`` and ``status`` (both null) added, in its SSE framing, without ``[DONE]``."""

    __slots__ = ()

    def __init__(self, *, request_id: str, model: str) -> None:
        super().__init__(request_id=request_id, model=model, chat=True, include_usage=False)
        self._tail = ',"message_id":null,"status":null' + self._tail

    def done(self) -> None:
        return None


def chatchat_relay_completion(openai_answer: dict[str, Any]) -> dict[str, Any]:
    """Chatchat's plain chat answered whole: the upstream's ``chat.completion`` plus its fields."""
    return {**openai_answer, **_RELAY_FIELDS}
