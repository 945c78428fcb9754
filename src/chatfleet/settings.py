"""ChatFleet's one configuration tree.

Every value can be set from the environment with the prefix ``CHATFLEET_`` and ``__`` between levels,
for example ``CHATFLEET_ADMISSION__ENGINE_SLOTS=64``. The Helm chart's values map onto the same keys.
Read once at start-up (``Settings()``) and passed down; nothing else reads the environment.
"""

from __future__ import annotations

import ipaddress
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = [
    "AdmissionSettings",
    "AuthSettings",
    "EmbeddingsSettings",
    "EngineKind",
    "EngineSettings",
    "KnowledgeSettings",
    "LimitsSettings",
    "LogSettings",
    "MIN_CHUNK_SIZE",
    "ServerSettings",
    "Settings",
    "StoreKind",
    "masked_dump",
]


class EngineKind(StrEnum):
    """Which engine the gateway sends requests to."""

    SIMULATED = "simulated"
    """The engine model, in this process: no GPU, no upstream. The default, for trying ChatFleet."""
    OPENAI = "openai"
    """Any OpenAI-compatible server (vLLM's in production) at ``engine.url``."""


def _url_problem(url: str) -> str | None:
    """Why ``url`` is no http(s) URL with a host and a valid port; None if it is one. Never
    quotes the URL: it may hold a password."""
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unclosed [IPv6 address
        return "it cannot be parsed as a URL"
    if parts.scheme not in ("http", "https"):
        return "its scheme is not http:// or https://"
    if not parts.hostname:
        return "it has no host"
    try:
        port = parts.port
    except ValueError:  # not a number, or above 65535
        port = 0
    return "its port is not a number from 1 to 65535" if port == 0 else None


def _http_url(value: str) -> str:
    """``value`` (empty: unset) if it is a usable base URL, else a configuration error."""
    if value and (problem := _url_problem(value)):
        raise ValueError(f"{problem}: give an http(s) base URL including /v1, e.g. "
                         "http://127.0.0.1:8001/v1")
    return value


_HttpUrl = Annotated[str, AfterValidator(_http_url)]
"""An upstream's base URL, checked when the configuration is read, so that a bad one stops
``chatfleet serve`` with exit 2 before anything starts (a bad port would otherwise fail later,
where the URL is parsed)."""


class EngineSettings(BaseModel):
    kind: EngineKind = EngineKind.SIMULATED
    """Engine kind: ``simulated`` (embedded engine model) or ``openai`` (an upstream server)."""
    url: _HttpUrl | None = None
    """Upstream base URL including ``/v1``, e.g. ``http://127.0.0.1:8001/v1``. Required for ``openai``."""
    model: str | None = None
    """Served model id. ``openai``: required, the name the upstream lists (vLLM's
    --served-model-name). ``simulated``: defaults to ``chatfleet-sim/<profile>``."""
    api_key: SecretStr | None = None
    """Bearer token sent to the upstream, if it needs one. Never logged."""
    model_aliases: Annotated[list[str], NoDecode] = []
    """Other model names requests may send for the served model, e.g. the names a Chatchat WebUI's
    own configuration sends (``qwen:7b``, ``glm4-chat``). ``CHATFLEET_ENGINE__MODEL_ALIASES`` is a
    comma-separated list; ``*`` accepts any name. Answers always name the served model in their
    ``model`` field, and /v1/models lists the aliases. Empty (the default): another name gets 404."""
    profile: str = "tiny-cpu"
    """Latency profile of the simulated engine (a file in engines/profiles/)."""
    seed: int = 0
    """Seed of the simulated engine's token text and output lengths."""
    connect_timeout_s: float = Field(5.0, gt=0)
    """Seconds to open a connection to the upstream."""
    read_timeout_s: float = Field(120.0, gt=0)
    """Seconds the upstream may stay silent inside one response before the request fails."""
    max_connections: int = Field(2048, ge=1)
    """Connection pool size towards the upstream; must exceed engine slots."""
    health_interval_s: float = Field(2.0, gt=0)
    """Seconds between the readiness checks that list the upstream's models."""

    @field_validator("model_aliases", mode="before")
    @classmethod
    def _split_aliases(cls, value: Any) -> Any:
        """A comma-separated string (the environment) or a list; blanks dropped, repeats once.
        A listed alias may not hold a comma: the variable, and the chart, which joins its
        ``gateway.modelAliases`` into it, could never give that name."""
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
            return items  # the field's own validation refuses it
        if any("," in item for item in items):
            raise ValueError(
                "an alias cannot contain a comma: the variable is a comma-separated list (the "
                "chart joins gateway.modelAliases with commas); give each name on its own")
        return list(dict.fromkeys(item.strip() for item in items if item.strip()))


class AdmissionSettings(BaseModel):
    engine_slots: int = Field(64, ge=1)
    """Requests let through to the engine at once. Set equal to vLLM's --max-num-seqs."""
    max_queue: int = Field(512, ge=0)
    """Requests held waiting beyond the slots; one more gets 429."""
    max_queue_wait_s: float = Field(30.0, gt=0)
    """Longest a request may wait for a slot before it gets 429."""
    heartbeat_interval_s: float = Field(5.0, gt=0)
    """A queued stream gets its response headers and an SSE comment line this often while it waits.
    Until the first one, a queue timeout is a real HTTP 429; after it, an SSE error event."""
    interactive_reserved_slots: int | None = Field(None, ge=0)
    """Engine slots batch requests may never hold, so an interactive request does not wait behind
    a pod full of long batch answers. Default: an eighth of engine_slots, at least 1 (0 when
    engine_slots is 1). Must leave batch at least one slot."""

    @model_validator(mode="after")
    def _check_reserved(self) -> AdmissionSettings:
        if self.interactive_reserved_slots is not None and \
                self.interactive_reserved_slots >= self.engine_slots:
            raise ValueError(
                f"admission.interactive_reserved_slots ({self.interactive_reserved_slots}) must be "
                f"smaller than admission.engine_slots ({self.engine_slots}), or batch requests could "
                "never run: lower CHATFLEET_ADMISSION__INTERACTIVE_RESERVED_SLOTS")
        return self

    @property
    def reserved_for_interactive(self) -> int:
        """``interactive_reserved_slots``, or its default for ``engine_slots``."""
        if self.interactive_reserved_slots is not None:
            return self.interactive_reserved_slots
        return 0 if self.engine_slots == 1 else max(1, self.engine_slots // 8)


class ServerSettings(BaseModel):
    host: str = "127.0.0.1"
    """Address to bind. The chart sets 0.0.0.0 inside the pod."""
    port: int = Field(8000, ge=1, le=65535)
    drain_timeout_s: float = Field(30.0, ge=0)
    """On SIGTERM: how long in-flight and queued requests may take to finish before the process exits."""
    workers: int | Literal["auto"] = 1
    """Gateway worker processes serving one port. 1 (the default): one process, no supervisor.
    Above 1: a supervisor starts that many, restarts one that dies and drains all on SIGTERM
    (docs/operations.md, "Worker processes"). ``auto``: the container's CPU limit (cgroups),
    rounded up, else the CPUs this process may run on, at most 16; 1 with the simulated engine,
    which lives in one process."""
    worker_hang_timeout_s: float = Field(30.0, ge=1)
    """With workers above 1: a worker whose event loop sends the supervisor no heartbeat for this
    long (a blocking call, a deadlock, SIGSTOP) is killed and replaced."""
    keep_alive_s: float = Field(75.0, gt=0)
    """Idle keep-alive of client connections, and how long a new connection may send nothing.
    Keep it above the load balancer's idle timeout (60 s on common cloud LBs), or the proxy may
    reuse a connection the gateway is closing."""
    send_timeout_s: float = Field(30.0, gt=0)
    """A streamed answer whose client has read nothing for this long (its connection's buffers
    full) is ended: the connection is closed, the engine request aborted and the slot freed."""
    send_buffer_bytes: int | None = Field(None, ge=4096)
    """Kernel send buffer of each client connection (SO_SNDBUF). Unset: the kernel's autotuning
    (up to net.ipv4.tcp_wmem's maximum, 4 MiB by default), so a client that reads nothing pins up
    to that much memory, and ``send_timeout_s`` starts only once it is full. Token streams need
    little: 256 KiB bounds both."""
    max_header_bytes: int = Field(65536, ge=1024)
    """Longest request line and headers of one request; longer gets 431 and the connection
    closes. Clients send a few hundred bytes; 64 KiB is twice nginx's largest default (4 x 8 KiB)."""
    max_headers: int = Field(100, ge=1)
    """Most headers in one request; more gets 431 (Apache's LimitRequestFields default)."""
    header_timeout_s: float = Field(10.0, gt=0)
    """A request's line and headers must arrive within this of its first byte, else 408 and the
    connection closes. They come in one packet from a real client; 10 s allows a slow link."""
    body_timeout_s: float = Field(30.0, gt=0)
    """A request body that pauses this long between reads (time the gateway holds it back not
    counted) gets 408, the connection closes, the app sees a disconnect. As ``send_timeout_s``,
    the other way. A streamed answer is never timed: a request is complete once its body is read."""
    log_level: str = "info"
    slow_callback_s: float | None = Field(None, gt=0)
    """Turn on asyncio debug mode and log every event-loop callback slower than this (diagnostics)."""
    public_url: str | None = None
    """The gateway's address as its clients reach it, e.g. ``https://chat.example.com`` (a path
    prefix may follow): the base of kb_chat's reference links and /server/configs'
    ``api_address``, as Chatchat's ``API_SERVER.public_host/public_port``. Unset: reference links
    are relative (``/knowledge_base/download_doc?...``) and ``api_address`` is the bound address.
    Never taken from a request's ``Host`` header, which any client sets."""
    forwarded_allow_ips: Annotated[list[str], NoDecode] = []
    """Addresses or networks (comma-separated, e.g. ``10.0.0.0/8``; ``*``: any) of proxies whose
    ``X-Forwarded-For`` and ``X-Forwarded-Proto`` are believed, so that the client address (for
    the wrong-key limit) is the client's. Empty (the default): those headers are ignored, the
    address is the connection's peer."""

    @field_validator("public_url")
    @classmethod
    def _check_public_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        if problem := _url_problem(value):
            raise ValueError(f"{problem}: give the URL clients reach the gateway at, e.g. "
                             "https://chat.example.com")
        parts = urlsplit(value)
        if parts.query or parts.fragment:
            raise ValueError("it has a query or a fragment: give the URL clients reach the gateway "
                             "at, e.g. https://chat.example.com")
        return value.rstrip("/")

    @field_validator("workers", mode="before")
    @classmethod
    def _check_workers(cls, value: Any) -> Any:
        """A whole number from 1 to 256, or ``auto``: one message for either mistake."""
        text = str(value).strip().lower()
        if text == "auto":
            return "auto"
        if isinstance(value, bool) or not text.isdigit() or not 1 <= int(text) <= 256:
            raise ValueError("give a number of worker processes from 1 to 256, or auto (the "
                             "container's CPU limit)")
        return int(text)

    @field_validator("forwarded_allow_ips", mode="before")
    @classmethod
    def _split_proxies(cls, value: Any) -> Any:
        """A comma-separated string (the environment) or a list; blanks dropped; each an IP
        address, a network or ``*``."""
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
            return items  # the field's own validation refuses it
        proxies = [item.strip() for item in items if item.strip()]
        for item in proxies:
            if item != "*":
                try:
                    ipaddress.ip_network(item, strict=False)
                except ValueError:
                    raise ValueError(f"{item[:60]!r} is no IP address or network: give proxies "
                                     "as e.g. 10.0.0.7 or 10.0.0.0/8, or * for any") from None
        return proxies


class LogSettings(BaseModel):
    """How the gateway logs (the level is ``server.log_level``; docs/operations.md#logs)."""

    format: Literal["text", "json"] = "text"
    """``text``: one readable line per record. ``json``: one JSON object per line (time, level,
    logger, message, and an access line's fields as keys) for every log line of the process,
    uvicorn's included, for a log collector. The chart sets ``json``."""
    access: bool = True
    """One access-log line per request at INFO (probes, /load and /metrics scrapes at DEBUG):
    method, path, status, latency, request id, priority and queue wait; never keys, query strings,
    bodies or prompt text. Off: no line, and no X-Request-Id on answers that have none."""


class LimitsSettings(BaseModel):
    max_body_bytes: int = Field(1 << 20, ge=1024)
    """Largest request body accepted; larger gets 413."""
    max_tokens: int = Field(8192, ge=1)
    """Largest ``max_tokens`` a request may ask for."""
    max_messages: int = Field(512, ge=1)
    """Most messages in one chat request."""


class AuthSettings(BaseModel):
    """The per-key request-rate limit of API-key authentication (the keys are ``api_keys``).

    The limit is a token bucket per key **in each gateway process**: with N pods behind a
    Service, one key may send up to N times the rate to the fleet."""

    rate_limit_rps: float = Field(0.0, ge=0)
    """Requests per second one API key may send, sustained (every route but the probes, /load,
    /metrics and the API docs counts). 0 (the default): no limit. Needs ``api_keys``."""
    rate_limit_burst: int = Field(20, ge=1, le=1_000_000)
    """Requests one API key may send at once above the rate: the bucket's size; a key that has
    been idle starts with this many. Past it the key gets 429 with Retry-After. Used only when
    ``rate_limit_rps`` is above 0."""
    failed_keys_per_s: float = Field(1.0, ge=0)
    """Wrong API keys one client address (an IPv4 address, an IPv6 /64) may send per second,
    sustained, in each gateway process. Past ``failed_keys_burst`` the address gets 429 with
    Retry-After on every route that needs a key, its keys not even compared, until it is back
    under the rate: a key cannot be guessed at the speed of the network. 0: no limit. Behind a
    proxy every client has the proxy's address (one wrong client then holds back all) unless
    ``server.forwarded_allow_ips`` names the proxy. Used only with ``api_keys``."""
    failed_keys_burst: int = Field(20, ge=1, le=1_000_000)
    """Wrong API keys one client address may send at once before ``failed_keys_per_s`` applies."""


class StoreKind(StrEnum):
    """Where knowledge bases live."""

    LOCAL = "local"
    """Files, chunks and indexes under ``kb.data_dir``, shared by the pod's worker processes
    (each keeps the search indexes in memory). One replica only."""
    PGVECTOR = "pgvector"
    """PostgreSQL with pgvector at ``kb.pg_dsn``: every replica sees every upload at once."""


class EmbeddingsSettings(BaseModel):
    url: _HttpUrl | None = None
    """OpenAI-compatible base URL including ``/v1`` whose ``/embeddings`` embeds chunks and queries.
    Unset: retrieval is lexical (BM25) only, and /server/configs and every RAG answer say so."""
    model: str | None = None
    """Embedding model name sent to that endpoint. Required with ``url``."""
    api_key: SecretStr | None = None
    """Bearer token for the embeddings endpoint, if it needs one. Never logged."""
    batch_size: int = Field(64, ge=1, le=2048)
    """Texts per /embeddings request when ingesting."""
    max_concurrency: int = Field(4, ge=1, le=64)
    """Embedding requests in flight at once from one ingestion."""
    timeout_s: float = Field(60.0, gt=0)
    """Seconds one /embeddings request may take."""


MIN_CHUNK_SIZE = 50
"""The least kb.chunk_size, and the least chunk_size a request may ask for."""


class KnowledgeSettings(BaseModel):
    store: StoreKind = StoreKind.LOCAL
    """``local`` (one replica; files under data_dir) or ``pgvector`` (shared by all replicas)."""
    data_dir: Path = Path("data")
    """``local`` store: knowledge bases' files and indexes live here."""
    pg_dsn: SecretStr | None = None
    """``pgvector`` store: libpq connection URI, e.g. postgresql://user:pass@host:5432/db. Never
    logged."""
    pg_pool_size: int = Field(10, ge=1, le=200)
    """``pgvector`` store: connections kept open by one gateway process."""
    embeddings: EmbeddingsSettings = EmbeddingsSettings()
    chunk_size: int = Field(750, ge=MIN_CHUNK_SIZE, le=100_000)
    """Characters per chunk (Chatchat's CHUNK_SIZE). At least 50, and a request's own chunk_size
    below 50 is refused (422): a 1-character chunk made 153k chunks of a 185 KB file."""
    chunk_overlap: int = Field(150, ge=0, le=50_000)
    """Characters shared by neighbouring chunks (Chatchat's OVERLAP_SIZE)."""
    top_k: int = Field(3, ge=1, le=100)
    """Chunks put into a RAG prompt when the request does not say (Chatchat's VECTOR_SEARCH_TOP_K)."""
    score_threshold: float = Field(2.0, ge=0, le=2)
    """Default cut on a hit's score (its cosine distance to the question, halved: 0 same
    direction, 1 opposite); hits scoring above it are dropped. Chatchat's default, 2.0, keeps all."""
    max_upload_bytes: int = Field(64 << 20, ge=1024)
    """Largest upload_docs / upload_temp_docs request body; larger gets a clear error, nothing
    stored. (update_docs, JSON, has ``limits.max_body_bytes``.)"""
    max_files_per_upload: int = Field(100, ge=1)
    """Most files in one upload_docs request."""
    max_queued_uploads: int = Field(16, ge=0, le=10_000)
    """Upload, update and rebuild requests that may wait for an ingestion slot (two run per
    ingest worker), per gateway worker process; one more gets 429 with Retry-After."""
    temp_ttl_s: float = Field(3600.0, gt=0)
    """File chat (Chatchat's upload_temp_docs): a temporary knowledge base is deleted this long
    after its upload; a chat with it afterwards gets a clear 404 asking to upload again. Expired
    ones are swept every quarter of this, but at least 0.5 s and at most 60 s apart."""
    max_temp_kbs: int = Field(100, ge=1, le=100_000)
    """Temporary knowledge bases kept at once (in the store, so every replica serves them); past
    it, an upload that stored something deletes the oldest by upload time (Chatchat keeps 10 in
    one process's memory and drops the least recently used)."""
    ingest_workers: int = Field(1, ge=1, le=64)
    """Processes that load and split uploaded files, per gateway worker process, started on its
    first upload (each imports the document loaders: about 100-150 MB). Uploads beyond this many
    at once wait their turn."""
    max_file_text_chars: int = Field(20_000_000, ge=1000)
    """Most characters of text one file may hold once parsed (about a 10,000-page book); a file
    with more is refused with the reason, found while it is read (a .docx is checked before:
    a 261 KB zip bomb unpacked to gigabytes). Bounds the worker's and the gateway's memory."""
    max_file_chunks: int = Field(50_000, ge=1)
    """Most chunks one file may be split into (a CSV makes one per row); more is refused."""
    max_kb_chunks: int = Field(1_000_000, ge=1)
    """Most chunks one knowledge base may hold; an upload that would pass it is refused. (The
    local store keeps every chunk's terms and vector in the gateway's memory.)"""
    max_parse_s: float = Field(120.0, gt=0)
    """Longest one file may take to load and split in an ingest worker; past it the worker is
    killed (and replaced), the file refused with the reason, and the next upload goes on."""

    @model_validator(mode="after")
    def _check(self) -> KnowledgeSettings:
        if self.chunk_overlap >= self.chunk_size:
            raise ValueError(
                f"kb.chunk_overlap ({self.chunk_overlap}) must be smaller than kb.chunk_size "
                f"({self.chunk_size})")
        if self.store is StoreKind.PGVECTOR and self.pg_dsn is None:
            raise ValueError(
                "kb.store is 'pgvector' but kb.pg_dsn is empty: set CHATFLEET_KB__PG_DSN to a "
                "postgresql:// URI of a database where the vector extension exists or may be created")
        if self.embeddings.url and not self.embeddings.model:
            raise ValueError(
                "kb.embeddings.url is set but kb.embeddings.model is empty: set "
                "CHATFLEET_KB__EMBEDDINGS__MODEL to the embedding model the endpoint serves")
        return self


class Settings(BaseSettings):
    # hide_input_in_errors: a refused configuration names the field and the rule, never the raw
    # input, which holds api_keys, engine.api_key and kb.pg_dsn in clear (a Settings-level
    # check's input is the whole environment).
    model_config = SettingsConfigDict(
        env_prefix="CHATFLEET_", env_nested_delimiter="__", extra="forbid", validate_default=True,
        hide_input_in_errors=True,
    )

    api_keys: Annotated[list[SecretStr], NoDecode] = []
    """API keys clients must send as ``Authorization: Bearer <key>`` on every route but /livez,
    /readyz, /load, /metrics and the API docs. ``CHATFLEET_API_KEYS`` is a comma-separated list
    (spaces around keys and empty items are dropped); list two to rotate one. Empty (the default):
    no authentication. Never logged, never in /metrics or in error messages."""
    auth: AuthSettings = AuthSettings()
    engine: EngineSettings = EngineSettings()
    admission: AdmissionSettings = AdmissionSettings()
    server: ServerSettings = ServerSettings()
    log: LogSettings = LogSettings()
    limits: LimitsSettings = LimitsSettings()
    kb: KnowledgeSettings = KnowledgeSettings()

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_api_keys(cls, value: Any) -> Any:
        """A comma-separated string (the environment) or a list; blanks dropped, repeats once."""
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            return items  # the field's own validation refuses it (the input is hidden)
        keys: list[Any] = []
        seen: set[str] = set()
        for item in items:
            text = item.get_secret_value() if isinstance(item, SecretStr) else item
            if isinstance(text, str):
                text = text.strip()
                if not text or text in seen:
                    continue
                seen.add(text)
            keys.append(text)
        return keys

    @model_validator(mode="after")
    def _check_auth(self) -> Settings:
        if self.auth.rate_limit_rps > 0 and not self.api_keys:
            raise ValueError(
                "auth.rate_limit_rps is set but api_keys is empty: the limit counts requests per "
                "API key; set CHATFLEET_API_KEYS to a comma-separated list of keys, or "
                "CHATFLEET_AUTH__RATE_LIMIT_RPS=0")
        return self

    @model_validator(mode="after")
    def _check_engine(self) -> Settings:
        if self.engine.kind is EngineKind.OPENAI:
            if not self.engine.url:
                raise ValueError(
                    "engine.kind is 'openai' but engine.url is empty: set CHATFLEET_ENGINE__URL "
                    "to the upstream base URL, e.g. http://127.0.0.1:8001/v1")
            if not self.engine.model:
                raise ValueError(
                    "engine.kind is 'openai' but engine.model is empty: set CHATFLEET_ENGINE__MODEL "
                    "to the model name the upstream serves (vLLM's --served-model-name)")
        return self

    @property
    def served_model(self) -> str:
        """The model id clients send and /v1/models lists."""
        return self.engine.model or f"chatfleet-sim/{self.engine.profile}"


def masked_dump(settings: Settings) -> dict[str, Any]:
    """The effective configuration as plain data, secrets shown as '**********'."""
    return settings.model_dump(mode="json")
