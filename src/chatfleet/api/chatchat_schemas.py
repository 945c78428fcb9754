"""Wire models of Chatchat 0.3.1.3's chat routes (docs/api.md): its field names and defaults.

Chatchat's defaults come from its settings: temperature 0.7, top_k 3 chunks
(VECTOR_SEARCH_TOP_K), score_threshold 2.0 (SCORE_THRESHOLD), prompt_name "default", kb_chat
streamed unless ``stream`` is false. ``top_k`` here is the number of chunks, not vLLM's sampling
top_k. Unknown fields are ignored, as Chatchat's ``extra = "allow"`` models do.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from chatfleet.api.schemas import ChatMessageIn

__all__ = ["ChatchatChatRequest", "HistoryMessage", "KbChatOptions", "KbChatRequest"]

Temperature = Annotated[float, Field(ge=0.0, le=2.0)]


class HistoryMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class KbChatOptions(BaseModel):
    """The retrieval fields shared by /chat/kb_chat and the OpenAI-style KB route."""

    model_config = ConfigDict(extra="ignore")

    top_k: Annotated[int, Field(ge=1, le=100)] | None = Field(
        None, description="Chunks put into the prompt; default kb.top_k (3)")
    score_threshold: Annotated[float, Field(ge=0.0, le=2.0)] | None = Field(
        None, description="Drop chunks whose halved cosine distance to the question is above it; "
                          "default kb.score_threshold (2.0, keeps all)")
    prompt_name: str = "default"
    return_direct: bool = Field(False, description="Answer with the retrieved chunks only, no LLM")


class KbChatRequest(KbChatOptions):
    query: str = Field(min_length=1, examples=["你好"])
    mode: Literal["local_kb", "temp_kb", "search_engine"] = "local_kb"
    kb_name: str = Field("", examples=["samples"])
    history: list[HistoryMessage] = Field(default_factory=list)
    stream: bool = True
    model: str | None = None
    temperature: Temperature = 0.7
    max_tokens: Annotated[int, Field(ge=1)] | None = None


class ChatchatChatRequest(KbChatOptions):
    """Body of /chat/chat/completions and /knowledge_base/{mode}/{param}/chat/completions:
    OpenAI's chat fields with Chatchat's defaults, plus (KB route) the retrieval fields."""

    messages: Annotated[list[ChatMessageIn], Field(min_length=1)]
    model: str | None = None
    stream: bool | None = None
    temperature: Temperature | None = 0.7
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    max_tokens: Annotated[int, Field(ge=0)] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None

    def sampling(self) -> dict[str, Any]:
        names = ("temperature", "top_p", "stop", "seed", "presence_penalty", "frequency_penalty")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}
