"""What the picker reads from a request: its priority and the prefix its prompt starts with.

The priority, first found wins: the ``X-ChatFleet-Priority`` header (set by infrastructure, as
the gateway reads it); the Inference Extension's objective, named by the
``x-gateway-inference-objective`` header, whose InferenceObjective's priority below 0 means
sheddable (batch) and 0 or above interactive; the body's ``priority`` field. When the objective
decides, the picker sets ``X-ChatFleet-Priority`` on the request too, so the pod's own admission
queues it as the picker routed it.

The picker does not validate requests: a body that is not JSON, or an unknown priority, is
routed as interactive without a prefix, and the pod answers it with its own 400 and message,
the same whether or not a picker sits in front.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import orjson

__all__ = ["OBJECTIVE_HEADER", "PRIORITY_HEADER", "RequestFacts", "request_facts"]

PRIORITY_HEADER = "x-chatfleet-priority"
OBJECTIVE_HEADER = "x-gateway-inference-objective"


@dataclass(frozen=True, slots=True)
class RequestFacts:
    batch: bool
    prefix_key: str | None
    priority_from_objective: bool = False
    """The objective decided the priority: the picker tells the pod (``X-ChatFleet-Priority``)."""


def request_facts(headers: Mapping[str, str], body: bytes, *, prefix_chars: int,
                  objectives: Mapping[str, int] | None = None) -> RequestFacts:
    """``headers`` with lower-case names; ``objectives``: the pool's InferenceObjectives' priorities
    by name. ``prefix_chars`` 0 turns prefix affinity off."""
    document = _json_object(body)
    prefix = _prompt_prefix(document, prefix_chars) if document is not None and prefix_chars else None
    priority: object = headers.get(PRIORITY_HEADER)
    if priority is None and objectives:
        objective = objectives.get(headers.get(OBJECTIVE_HEADER, ""))
        if objective is not None:
            return RequestFacts(batch=objective < 0, prefix_key=prefix, priority_from_objective=True)
    if priority is None and document is not None:
        priority = document.get("priority")
    batch = isinstance(priority, str) and priority.strip().lower() == "batch"
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
