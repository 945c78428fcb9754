"""Wire models of Chatchat 0.3.1.3's routes (docs/api.md): its field names and defaults, and the
shapes its answers take (documentation for /openapi.json; the routes build the JSON themselves).

Chatchat's defaults come from its settings: temperature 0.7, top_k 3 chunks
(VECTOR_SEARCH_TOP_K), score_threshold 2.0 (SCORE_THRESHOLD), prompt_name "default", kb_chat
streamed unless ``stream`` is false. ``top_k`` here is the number of chunks, not vLLM's sampling
top_k. Unknown fields are ignored, as Chatchat's ``extra = "allow"`` models do.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from chatfleet.api.schemas import (
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatMessageIn,
    ErrorDetail,
    refuse_many_parts,
)

__all__ = ["ChatchatChatRequest", "ChatchatEnvelope", "ChatchatRelayChunk",
           "ChatchatRelayCompletion", "ChatchatRefusal", "FileChatAnswer", "FileChatEvent",
           "FileChatRequest", "HistoryMessage", "KbChatChunk", "KbChatCompletion",
           "KbChatOptions", "KbChatRequest", "KbDocument", "KbProgressEvent"]

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


class FileChatRequest(BaseModel):
    """Body of /chat/file_chat: a question about the files of a temporary knowledge base."""

    model_config = ConfigDict(extra="ignore")

    query: str = Field(min_length=1, examples=["你好"])
    knowledge_id: str = Field(description="The id /knowledge_base/upload_temp_docs answered")
    top_k: Annotated[int, Field(ge=1, le=100)] | None = Field(
        None, description="Chunks put into the prompt; default kb.top_k (3)")
    score_threshold: Annotated[float, Field(ge=0.0, le=2.0)] | None = Field(
        None, description="Default kb.score_threshold (2.0, keeps all)")
    history: list[HistoryMessage] = Field(default_factory=list)
    stream: bool = False
    model_name: str | None = Field(None, description="Chatchat's name for the model field")
    temperature: Annotated[float, Field(ge=0.0, le=1.0)] = 0.01
    max_tokens: Annotated[int, Field(ge=0)] | None = Field(
        None, description="0 or none: the deployment's limit")
    prompt_name: str = "default"


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

    _few_parts = model_validator(mode="before")(refuse_many_parts)

    def sampling(self) -> dict[str, Any]:
        names = ("temperature", "top_p", "stop", "seed", "presence_penalty", "frequency_penalty")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


# -- answers (documentation of what the routes return) -----------------------------------------


class ChatchatEnvelope(BaseModel):
    """Chatchat's ``BaseResponse``: the outcome is ``code`` (200 success; 403, 404, 422, 500 ...),
    whatever the HTTP status."""

    code: int
    msg: str
    data: Any = None


class ChatchatRefusal(ChatchatEnvelope):
    """One of Chatchat's refusals (unknown model, missing knowledge base ...) where an OpenAI SDK
    must see it: Chatchat's envelope with OpenAI's ``error`` beside it. The answer of the
    OpenAI-style routes (under the code as HTTP status), and the one event of a streamed
    kb_chat or file_chat request's refusal."""

    error: ErrorDetail


class FileChatEvent(BaseModel):
    """One event of a streamed /chat/file_chat answer: a token (``answer``), the references
    last (``docs``), or a failure (``code`` and ``msg``)."""

    answer: str | None = None
    docs: list[str] | None = None
    code: int | None = None
    msg: str | None = None
    error_type: str | None = None
    retry_after: float | None = None


class FileChatAnswer(BaseModel):
    """/chat/file_chat answered whole."""

    answer: str
    docs: list[str]


class ChatchatRelayCompletion(ChatCompletionResponse):
    """/chat/chat/completions answered whole: the OpenAI object with Chatchat's two fields."""

    message_id: str | None = None
    status: int | None = None


class ChatchatRelayChunk(ChatCompletionChunk):
    """One event of /chat/chat/completions streamed: the OpenAI chunk with Chatchat's two fields."""

    message_id: str | None = None
    status: int | None = None


class RetrievedChunk(BaseModel):
    file_name: str
    chunk: int
    score: float | None


class RetrievalInfo(BaseModel):
    """ChatFleet's addition to a knowledge-base answer: how it retrieved."""

    mode: str
    seconds: float
    chunks: list[RetrievedChunk]


class KbAnswerFields(BaseModel):
    id: str
    model: str | None
    created: int
    status: int | None = None
    message_type: int
    message_id: str | None = None
    is_ref: bool


class KbMessage(BaseModel):
    role: Literal["assistant"]
    content: str
    finish_reason: str | None
    tool_calls: list[Any]


class KbChoice(BaseModel):
    message: KbMessage


class KbChatCompletion(KbAnswerFields):
    """A knowledge-base answer whole (Chatchat's ``OpenAIChatOutput``)."""

    object: Literal["chat.completion"]
    docs: list[str] = Field(description="The references, as Chatchat formats them")
    retrieval: RetrievalInfo | None = None
    choices: list[KbChoice]


class KbDelta(BaseModel):
    content: str
    tool_calls: list[Any]


class KbChunkChoice(BaseModel):
    delta: KbDelta
    role: Literal["assistant"]


class KbChatChunk(KbAnswerFields):
    """One event of a streamed knowledge-base answer: the first carries ``docs`` (and
    ``retrieval``); an error is a chunk whose content is the message, with ``error`` beside it."""

    object: Literal["chat.completion.chunk"]
    docs: list[str] | None = None
    retrieval: RetrievalInfo | None = None
    choices: list[KbChunkChoice]
    error: str | None = None
    code: int | None = None
    error_type: str | None = None
    retry_after: int | None = None


class KbDocument(BaseModel):
    """A chunk as /knowledge_base/search_docs answers it (Chatchat's ``DocumentWithVSId``)."""

    page_content: str
    metadata: dict[str, Any]
    type: Literal["Document"]
    id: str
    score: float | None = Field(description="Null when the chunk was listed, not searched")


class KbProgressEvent(BaseModel):
    """One event of /knowledge_base/recreate_vector_store: a file done (code 200, with ``total``,
    ``finished``, ``doc``; and ``skipped`` when it was deleted or written again during the
    rebuild, and left so) or failed (500), a missing or deleted knowledge base (404, the last
    event) or a busy replica (429)."""

    code: int
    msg: str
    total: int | None = None
    finished: int | None = None
    doc: str | None = None
    skipped: str | None = None
