"""What the picker reads from a request: its priority and the prefix its prompt starts with.

The picker does not validate requests: a body that is not JSON, or an unknown priority, is
routed as interactive without a prefix, and the pod answers it with its own 400 and message,
the same whether or not a picker sits in front.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import orjson

__all__ = ["PRIORITY_HEADER", "RequestFacts", "request_facts"]

PRIORITY_HEADER = "x-chatfleet-priority"


@dataclass(frozen=True, slots=True)
class RequestFacts:
    batch: bool
    prefix_key: str | None


def request_facts(headers: Mapping[str, str], body: bytes, *, prefix_chars: int) -> RequestFacts:
    """``headers`` with lower-case names. The header's priority wins over the body's, as in the
    gateway. ``prefix_chars`` 0 turns prefix affinity off."""
    document = _json_object(body)
    priority = headers.get(PRIORITY_HEADER)
    if priority is None and document is not None:
        priority = document.get("priority")
    batch = isinstance(priority, str) and priority.strip().lower() == "batch"
    prefix = _prompt_prefix(document, prefix_chars) if document is not None and prefix_chars else None
    return RequestFacts(batch=batch, prefix_key=prefix)


def _json_object(body: bytes) -> dict[str, object] | None:
    if not body:
        return None
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return document if isinstance(document, dict) else None


def _prompt_prefix(document: dict[str, object], limit: int) -> str | None:
    """The model and the start of the prompt as the engine would see it (chat messages' roles and
    text in order, or the completion prompt), cut at ``limit`` characters."""
    messages, prompt = document.get("messages"), document.get("prompt")
    if isinstance(messages, list):
        texts: list[str] = []
        size = 0
        for message in messages:
            if size >= limit:
                break
            if isinstance(message, dict):
                texts.append(f"{message.get('role', '')}:{_message_text(message.get('content'))}\x1e")
                size += len(texts[-1])
        prompt = "".join(texts)
    elif not isinstance(prompt, str):
        return None
    return f"{document.get('model', '')}\x1f{prompt[:limit]}"


def _message_text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: the text ones
        return "".join(part.get("text", "") for part in content
                       if isinstance(part, dict) and isinstance(part.get("text"), str))
    return ""
