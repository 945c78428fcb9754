"""Wire models of the OpenAI-compatible routes: requests validated here, responses documented here.

Fields follow OpenAI's order; vLLM's sampling extras (top_k, min_p, repetition_penalty, ignore_eos,
min_tokens) come after, then ChatFleet's own ``priority``. Fields that would change the *shape* of the
answer and that the gateway does not relay (tools, logprobs, n > 1, echo, best_of, suffix) are refused
with a 400 that says so, rather than silently dropped. Other unknown fields are ignored and their
names logged, as vLLM does.
"""

from __future__ import annotations

import math

from typing import Annotated, Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, Strict, field_validator, model_validator

from chatfleet.engines.base import FinishReason
from chatfleet.serving.admission import Priority

__all__ = [
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "CompletionChunk",
    "CompletionRequest",
    "CompletionResponse",
    "EmbeddingRequest",
    "EmbeddingResponse",
    "ErrorResponse",
    "ModelList",
    "StreamOptions",
]

Role = Literal["system", "developer", "user", "assistant", "tool"]
SAMPLING_FIELDS = ("temperature", "top_p", "stop", "seed", "presence_penalty", "frequency_penalty",
                   "logit_bias", "user", "response_format", "top_k", "min_p", "repetition_penalty",
                   "ignore_eos", "min_tokens")
"""Request fields passed to the engine as they are."""
MAX_CONTENT_PARTS = 1024
"""Most content parts (``{"type": "text", ...}``) in one chat request, all messages together;
counted before the parts are validated, so a body of tens of thousands costs the event loop
about a millisecond, not a hundred (measured: 25,000 parts took 40-150 ms to validate)."""

# Numbers and flags are read strictly, as OpenAI's API does: ``max_tokens: true`` or ``"5"`` is a
# 400 naming the field, not 1 or 5. (A float field takes an integer: JSON does not tell them apart.)
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]
Bool = Annotated[bool, Strict()]


def _non_finite(value: Any) -> bool:
    """Whether ``value`` is, or holds, a float that is not finite (NaN, infinity)."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_non_finite(v) for v in value.values())
    if isinstance(value, list):
        return any(_non_finite(v) for v in value)
    return False


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="after")
    def _finite_numbers(self) -> _Request:
        """Python's JSON reader takes ``NaN`` and ``Infinity``; JSON has no such numbers, and a
        field passed to the engine holding one failed on the way out (a 500): refuse it here."""
        values = self.__dict__
        for name in SAMPLING_FIELDS:
            value = values.get(name)
            if value is not None and _non_finite(value):
                raise ValueError(f"{name} holds NaN or Infinity, which JSON has no numbers for: "
                                 "send a finite number")
        return self

    def ignored_fields(self) -> list[str]:
        """Names of fields this API does not know (logged by name, never by value)."""
        return sorted(self.model_extra or {})

    def sampling(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in SAMPLING_FIELDS
                if getattr(self, name, None) is not None}


def refuse_many_parts(data: Any) -> Any:
    """A ``mode="before"`` check of a chat body's ``messages``: at most MAX_CONTENT_PARTS content
    parts in all. Shapes it does not know are left to the model's own validation."""
    messages = data.get("messages") if isinstance(data, dict) else None
    if isinstance(messages, list):
        parts = sum(len(m["content"]) for m in messages
                    if isinstance(m, dict) and isinstance(m.get("content"), list))
        if parts > MAX_CONTENT_PARTS:
            raise ValueError(f"messages hold {parts} content parts; at most {MAX_CONTENT_PARTS} are "
                             "accepted per request: join the text parts of a message into one "
                             "string")
    return data


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessageIn(BaseModel):
    role: Role
    content: str | list[TextPart] | None = None
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _only_text_parts(cls, value: Any) -> Any:
        if isinstance(value, list):
            for i, part in enumerate(value):
                if isinstance(part, dict) and part.get("type") not in (None, "text"):
                    raise ValueError(f"content part {i} has type {part.get('type')!r}; only 'text' "
                                     "parts are supported by this deployment")
        return value

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    include_usage: Bool = False


class _SamplingFields(_Request):
    temperature: Annotated[Float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Float, Field(gt=0, le=1)] | None = None
    n: Int = Field(1, description="Choices per request: only 1 is served",
                   json_schema_extra={"minimum": 1, "maximum": 1})
    stream: Bool = False
    stream_options: StreamOptions | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: Int | None = None
    presence_penalty: Annotated[Float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[Float, Field(ge=-2, le=2)] | None = None
    logit_bias: dict[str, Annotated[Float, Field(ge=-100, le=100)]] | None = None
    user: str | None = None
    response_format: dict[str, Any] | None = None
    # vLLM sampling extras
    top_k: Int | None = None
    min_p: Annotated[Float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[Float, Field(gt=0)] | None = None
    ignore_eos: Bool | None = None
    min_tokens: Annotated[Int, Field(ge=0)] | None = None
    # ChatFleet
    priority: Priority | None = Field(
        None, description="Admission priority: interactive (default) is served before batch.")

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int) -> int:
        if value != 1:
            raise ValueError(f"n={value} is not supported: this deployment returns one choice; "
                             "send n=1 or omit it")
        return value

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


def _refuse(model: BaseModel, fields: dict[str, str]) -> None:
    # Read declared fields from __dict__: getattr() on an undeclared name goes through pydantic's
    # __getattr__, which builds an AttributeError per call (measurable on the request path).
    values = {**model.__dict__, **(model.model_extra or {})}
    for name, why in fields.items():
        value = values.get(name)
        if value not in (None, False, [], {}, 0, "none"):
            raise ValueError(f"'{name}' is not supported by this deployment ({why}); remove it")


class ChatCompletionRequest(_SamplingFields):
    model: str = Field(min_length=1)
    messages: Annotated[list[ChatMessageIn], Field(min_length=1)]
    max_tokens: Annotated[Int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[Int, Field(ge=1)] | None = None

    _few_parts = model_validator(mode="before")(refuse_many_parts)

    @model_validator(mode="after")
    def _no_shape_changes(self) -> ChatCompletionRequest:
        _refuse(self, {"tools": "tool calls are not relayed", "functions": "tool calls are not relayed",
                       "logprobs": "log-probabilities are not relayed",
                       "top_logprobs": "log-probabilities are not relayed"})
        return self

    def output_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_SamplingFields):
    model: str = Field(min_length=1)
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]
    max_tokens: Annotated[Int, Field(ge=1)] | None = 16

    @model_validator(mode="after")
    def _no_shape_changes(self) -> CompletionRequest:
        _refuse(self, {"echo": "echoing the prompt is not relayed",
                       "logprobs": "log-probabilities are not relayed",
                       "suffix": "suffixes are not relayed"})
        best_of = (self.model_extra or {}).get("best_of")
        if best_of not in (None, 1):
            raise ValueError("'best_of' must be 1 or omitted: this deployment returns one choice")
        return self

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def output_limit(self) -> int | None:
        return self.max_tokens


# -- responses (documentation of what the routes return) --------------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | None = None
    retry_after: int | None = Field(
        None, description="On a stream's error event, when waiting helps: seconds to wait")


class ErrorResponse(BaseModel):
    error: ErrorDetail


class UsageOut(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatMessageOut(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: None = None
    finish_reason: FinishReason | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageOut | None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: FinishReason | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageOut | None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: None = None
    finish_reason: FinishReason | None


class ChatCompletionChunk(BaseModel):
    """One event of a streamed chat answer; with ``stream_options.include_usage`` every chunk has
    ``usage: null`` and a last one, with empty ``choices``, the usage."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageOut | None = None


class CompletionChunk(BaseModel):
    """One event of a streamed text completion (``usage`` as on ``ChatCompletionChunk``)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageOut | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# -- embeddings --------------------------------------------------------------------------------

MAX_EMBEDDING_INPUTS = 2048
"""Most texts in one embeddings request (OpenAI's own limit)."""


def _input_problem(value: Any) -> str | None:
    """What is wrong with an embeddings ``input``, or None when it is text."""
    if isinstance(value, str):
        return None
    if not isinstance(value, list):
        return "must be a string or a list of strings"
    if not value:
        return "must not be an empty list: send at least one text"
    if len(value) > MAX_EMBEDDING_INPUTS:
        return (f"has {len(value)} texts; the limit is {MAX_EMBEDDING_INPUTS} per request: send "
                "them in several requests")
    for i, item in enumerate(value):
        if isinstance(item, int | list) and not isinstance(item, bool):
            return ("token-id input is not supported: only text input is supported here; send a "
                    "string or a list of strings")
        if not isinstance(item, str):
            return f"item {i} is {type(item).__name__}; every input must be a string"
    return None


class EmbeddingRequest(_Request):
    """OpenAI's embeddings request. Token-id input (lists of ints) is refused, with a message that
    says so: only text is embedded here, and the gateway's embedding upstream need not share any
    client's tokenizer."""

    input: str | Annotated[list[str], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)]
    model: str = Field(min_length=1)
    dimensions: Annotated[Int, Field(ge=1)] | None = None
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        problem = _input_problem(value)
        if problem is not None:
            raise ValueError(problem)  # pydantic makes a 400 of ValueError, not of TypeError
        return value

    def texts(self) -> list[str]:
        # The validator above lets only a str or a list of str through.
        return [self.input] if isinstance(self.input, str) else cast(list[str], self.input)


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str
    """Floats, or with ``encoding_format: base64`` the little-endian float32 bytes in base64."""


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage
