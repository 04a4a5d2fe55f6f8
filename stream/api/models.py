"""Request and response bodies of the HTTP API (pydantic: they validate the requests AND
generate the OpenAPI document, so the document cannot drift from what the server accepts).

Shapes follow the APIs embedding users already call: OpenAI's `POST /v1/embeddings` and
Hugging Face text-embeddings-inference's (TEI) `POST /embed`, `POST /rerank`, `GET /info`.
What is ours is an *extension* carried in the same body: which conversation's memory the
inputs are embedded against (`conversation_id`, `tenant`), whether they are queries or
passages (`input_type`), and what to do when the conversation is unknown. Without a
conversation every endpoint is memory-less.

Validation is strict (`extra="forbid"`): a misspelt extension field must be an error, not a
silently memory-less answer. String constraints are written as JSON-Schema-expressible
`pattern`s where possible so that the generated document says what the server enforces.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic_core import PydanticCustomError

from schemas.events import QueryResponse
from schemas.fields import (
    MAX_CONVERSATION_ID_CHARS,
    MAX_QUERY_CHARS,
    MAX_TENANT_CHARS,
    SCHEMA_VERSION,
    _no_control_chars,
)

_NO_CONTROLS = r"^[^\x00-\x1f\x7f-\x9f]*$"

ConversationIdField = Annotated[
    str,
    Field(min_length=1, max_length=MAX_CONVERSATION_ID_CHARS, pattern=_NO_CONTROLS,
          description="the conversation whose live memory the inputs are embedded against"),
    AfterValidator(_no_control_chars),
]
TenantField = Annotated[
    str,
    Field(min_length=1, max_length=MAX_TENANT_CHARS, pattern=_NO_CONTROLS,
          description="the conversation's tenant; omitted: the API key's only tenant, else the default tenant"),
    AfterValidator(_no_control_chars),
]


def _no_lone_surrogates(value: str) -> str:
    """JSON can carry an unpaired surrogate escape (\\ud800); such a string cannot be encoded
    to UTF-8, so it cannot be tokenised: refuse it here (422) instead of failing in the model."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise PydanticCustomError("lone_surrogate", "text contains an unpaired surrogate (not valid Unicode)") from None
    return value


InputText = Annotated[str, Field(max_length=MAX_QUERY_CHARS), AfterValidator(_no_lone_surrogates)]


class InputType(StrEnum):
    """How a text is read. `query`: stripped, instruction prefix + text + end-of-text (as the
    reference client embeds a query); `passage`: text + end-of-text (as the reference embeds a
    stored turn or document)."""

    QUERY = "query"
    PASSAGE = "passage"


class UnknownConversation(StrEnum):
    """What a request naming a conversation that has no memory gets: `error` = 404;
    `memoryless` = embedded against an empty memory (the answer says `applied_seq: -1`)."""

    ERROR = "error"
    MEMORYLESS = "memoryless"


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MemoryExtension(_Body):
    """evostream's extension fields, shared by every POST endpoint."""

    conversation_id: ConversationIdField | None = None
    tenant: TenantField | None = None
    unknown_conversation: UnknownConversation = UnknownConversation.ERROR


class MemoryInfo(_Body):
    """Which memory an answer was computed against (absent when memory-less was asked)."""

    conversation_id: str
    tenant: str | None
    applied_seq: int = Field(ge=-1, description="last turn contained in the memory; -1 = empty memory")
    memory_len: int = Field(ge=0, description="latents in the memory queue")


# --------------------------------------------------------------------------- errors


class ErrorBody(_Body):
    """Every non-2xx answer. `error` never contains request input."""

    error: str
    error_type: str


# --------------------------------------------------------------------------- OpenAI


class EmbeddingsRequest(MemoryExtension):
    """OpenAI `POST /v1/embeddings`. `model` is accepted and not used (one model per worker:
    `GET /info`); `dimensions` is refused unless it is the model's own dimension (vectors
    cannot be shortened without changing what they mean); token-array inputs are refused."""

    input: InputText | Annotated[list[InputText], Field(min_length=1)]
    model: Annotated[str, Field(min_length=1, max_length=256)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1)] | None = None
    user: Annotated[str, Field(max_length=256)] | None = None
    input_type: InputType = InputType.QUERY


class EmbeddingData(_Body):
    object: Literal["embedding"] = "embedding"
    index: int = Field(ge=0)
    embedding: list[float] | str = Field(description="floats, or base64 of little-endian float32")


class Usage(_Body):
    prompt_tokens: int = Field(ge=0, description="tokens the model read for the inputs (instruction included)")
    total_tokens: int = Field(ge=0)


class EmbeddingsResponse(_Body):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: Usage
    checkpoint: str = Field(description="fingerprint of the model checkpoint: vectors from different ones are not comparable")
    memory: MemoryInfo | None = None


# --------------------------------------------------------------------------- TEI


class EmbedRequest(MemoryExtension):
    """TEI `POST /embed`. Vectors are always L2-normalised (the model's output); asking for
    `normalize: false` or `truncate: true` is refused rather than ignored."""

    inputs: InputText | Annotated[list[InputText], Field(min_length=1)]
    normalize: Literal[True] = True
    truncate: Literal[False] = False
    input_type: InputType = InputType.QUERY


class RerankRequest(MemoryExtension):
    """TEI `POST /rerank` with the reference client's `rerank` semantics: every text is read
    as one user turn (ChatML) advancing a copy of the memory, and embedded against the memory
    as it stood before it; the stripped query (instruction prefix) is embedded against the
    memory after all texts; texts are ranked by cosine similarity, best first, ties by index.
    The conversation's stored memory is never changed."""

    query: InputText
    texts: Annotated[list[InputText], Field(min_length=1)]
    return_text: bool = False
    raw_scores: Literal[False] = False
    truncate: Literal[False] = False
    top_n: Annotated[int, Field(ge=1)] | None = None


class RerankHit(_Body):
    index: int = Field(ge=0)
    score: float
    text: str | None = None


class Limits(_Body):
    max_inputs: int
    max_input_tokens: int
    max_input_chars: int
    max_body_bytes: int
    query_queue_max: int
    query_batch_max: int


class InfoResponse(_Body):
    """TEI-style `GET /info`, plus the checkpoint fingerprint (vectors from different
    fingerprints are not comparable) and the limits."""

    model_id: str
    model_type: Literal["embedding"] = "embedding"
    checkpoint: str
    embedding_dim: int
    max_input_length: int
    dtype: str
    device: str
    version: str
    auth: Literal["required", "off"]
    limits: Limits


class HealthResponse(_Body):
    status: Literal["ok"] = "ok"


# --------------------------------------------------------------------------- legacy /v1/query


class QueryRequest(_Body):
    """`POST /v1/query` (kept for existing callers; deprecated in favour of /v1/embeddings): one
    query against one conversation. The answer is `schemas.events.QueryResponse`."""

    schema_version: Literal[1] = SCHEMA_VERSION
    conversation_id: ConversationIdField
    query: Annotated[str, Field(min_length=1, max_length=MAX_QUERY_CHARS), AfterValidator(_no_lone_surrogates)]
    k: int = Field(default=5, ge=1, le=100)
    tenant: TenantField | None = None
    unknown_conversation: UnknownConversation = UnknownConversation.ERROR


__all__ = ["EmbedRequest", "EmbeddingData", "EmbeddingsRequest", "EmbeddingsResponse", "ErrorBody",
           "HealthResponse", "InfoResponse", "InputType", "Limits", "MemoryExtension", "MemoryInfo", "QueryRequest",
           "QueryResponse", "RerankHit", "RerankRequest", "UnknownConversation", "Usage"]
