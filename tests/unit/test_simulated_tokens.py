"""The simulated engine's tokenizer, which feeds the prefix cache: as many tokens as it bills, and
equal block hashes exactly where two prompts start with the same text."""

from __future__ import annotations

import pytest

from chatfleet.engines.base import ChatMessage, GenerationRequest
from chatfleet.engines.simulated import count_prompt_tokens, prompt_block_hashes, prompt_tokens

SYSTEM = "You are a careful assistant. " * 40  # 1160 characters, 290 tokens


def chat(*messages: tuple[str, str]) -> GenerationRequest:
    return GenerationRequest(request_id="r", model="m",
                             messages=tuple(ChatMessage(role, content) for role, content in messages))


def completion(prompt: str) -> GenerationRequest:
    return GenerationRequest(request_id="r", model="m", prompt=prompt)


@pytest.mark.parametrize("request_", [
    chat(("system", SYSTEM), ("user", "What is 2 + 2?")),
    chat(("user", "")),
    chat(("user", "héllo wörld ✓ 漢字"), ("assistant", "x"), ("user", "and?")),
    completion(SYSTEM),
    completion(""),
    completion("abc"),
], ids=["system+user", "empty message", "non-ascii turns", "long prompt", "empty prompt", "short prompt"])
def test_the_tokens_are_as_many_as_the_engine_counts(request_: GenerationRequest) -> None:
    assert len(prompt_tokens(request_)) == count_prompt_tokens(request_)


def test_chats_with_the_same_system_prompt_share_its_blocks_and_no_more() -> None:
    a = prompt_block_hashes(chat(("system", SYSTEM), ("user", "What is 2 + 2?" * 20)), 16)
    b = prompt_block_hashes(chat(("system", SYSTEM), ("user", "Name a colour." * 20)), 16)
    # The system message (3 template tokens, 290 of text, 1 closing) and the user message's 3
    # opening template tokens are the same: 297 tokens, 18 full blocks; the 19th holds user text.
    shared = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    assert shared == 297 // 16
    assert prompt_block_hashes(chat(("system", SYSTEM), ("user", "hi")), 16)[:shared] == a[:shared]


def test_the_same_text_in_another_role_shares_nothing() -> None:
    as_system = prompt_block_hashes(chat(("system", SYSTEM)), 16)
    as_user = prompt_block_hashes(chat(("user", SYSTEM)), 16)
    assert as_system and not set(as_system) & set(as_user)


def test_only_full_blocks_are_hashed() -> None:
    assert len(prompt_block_hashes(completion("x" * 4 * 47), 16)) == 2  # 47 tokens
    assert prompt_block_hashes(completion("x" * 4 * 15), 16) == ()
