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
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field
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
#: Token ids of one input, from this model's tokenizer (`POST /tokenize` gives them). The
#: document states the highest accepted id (the last plain-text id of the vocabulary).
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
#: What OpenAI's `input` and TEI's `inputs` take: a text, texts, one token-id list, or several.
Inputs = (InputText | Annotated[list[InputText], Field(min_length=1)] | TokenIds
          | Annotated[list[TokenIds], Field(min_length=1)])


def _only_normalized(value: bool) -> bool:
    if value is not True:
        raise PydanticCustomError(
            "normalize_unsupported",
            "normalize=false is not supported: EvoEmbedding normalises its embeddings inside the model (the "
            "unnormalised vector is never formed), so only true is accepted")
    return value


class TruncationDirection(StrEnum):
    """TEI's `truncation_direction`: which end of an over-long input is kept."""

    RIGHT = "right"   # keep the beginning, cut the end (TEI's default)
    LEFT = "left"     # keep the end


#: TEI clients write "Right"/"Left" as well as "right"/"left".
Direction = Annotated[TruncationDirection, BeforeValidator(lambda v: v.lower() if isinstance(v, str) else v)]


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
    """Every non-2xx answer of the TEI-style and evostream routes, TEI's shape (`error`,
    `error_type`; `detail` only on the operator probe `/readyz`). `error` never contains
    request input."""

    error: str
    error_type: str
    detail: dict[str, Any] | None = Field(None, description="/readyz only: the state behind a 503")


class OpenAIError(_Body):
    message: str
    type: str = Field(description="invalid_request_error (4xx), rate_limit_error (429) or server_error (5xx)")
    param: str | None = Field(None, description="the request field at fault, when one is")
    code: str = Field(description="evostream's error type, the same word the TEI routes put in error_type")


class OpenAIErrorBody(_Body):
    """Every non-2xx answer of the OpenAI routes (`/v1/embeddings`, `/v1/models`, unknown
    `/v1/...` paths): OpenAI's shape, which the `openai` client reads into `e.message`,
    `e.type`, `e.code` and `e.param`."""

    error: OpenAIError


# --------------------------------------------------------------------------- OpenAI


class EmbeddingsRequest(MemoryExtension):
    """OpenAI `POST /v1/embeddings`. `model` is optional, accepted and not used (one model per
    worker: `GET /v1/models`); `dimensions` is refused unless it is the model's own dimension
    (vectors cannot be shortened without changing what they mean). Token-id inputs are
    decoded with the model's tokenizer and then read like text."""

    input: Inputs
    model: Annotated[str, Field(min_length=1, max_length=256)] | None = None
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
    """TEI `POST /embed`. Vectors are always L2-normalised (the model's output): `normalize:
    false` is refused, saying why. `truncate: true` cuts an input over the token limit
    (`truncation_direction` says which end is kept) instead of answering 413."""

    inputs: Inputs
    normalize: Annotated[bool, AfterValidator(_only_normalized),
                         Field(json_schema_extra={"const": True})] = True
    truncate: bool | None = False
    truncation_direction: Direction = TruncationDirection.RIGHT
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
    raw_scores: bool = Field(False, description="accepted: scores are cosines with no activation applied, so raw "
                                                "and default scores are the same numbers")
    truncate: bool | None = False
    truncation_direction: Direction = TruncationDirection.RIGHT
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


class EmbeddingModelInfo(_Body):
    pooling: str = Field(description="how a sequence becomes one vector: the last token's hidden state")


class ModelTypeInfo(_Body):
    embedding: EmbeddingModelInfo


class InfoResponse(_Body):
    """TEI's `GET /info` fields, plus the checkpoint fingerprint (vectors from different
    fingerprints are not comparable), the device and the limits."""

    model_id: str
    model_sha: str | None = Field(None, description="the hub revision asked for (EVOSTREAM_MODEL_REVISION), if any")
    model_dtype: str = Field(description="the dtype the model computes in (EVOSTREAM_DTYPE)")
    model_type: ModelTypeInfo
    max_concurrent_requests: int = Field(description="query requests that may wait (EVOSTREAM_QUERY_QUEUE_MAX)")
    max_input_length: int = Field(description="tokens per input (EVOSTREAM_API_MAX_INPUT_TOKENS)")
    max_batch_tokens: int = Field(description="padded tokens per forward pass (EVOSTREAM_MAX_BATCH_TOKENS)")
    max_batch_requests: int | None = Field(description="texts per query pass (EVOSTREAM_QUERY_BATCH_MAX)")
    max_client_batch_size: int = Field(description="inputs per request (EVOSTREAM_API_MAX_INPUTS)")
    auto_truncate: bool = Field(description="false: an over-long input is refused (413) unless truncate=true")
    tokenization_workers: int
    version: str
    sha: str | None = None
    docker_label: str | None = None
    checkpoint: str
    embedding_dim: int
    dtype: str = Field(description="the dtype of the memory state")
    device: str
    auth: Literal["required", "off"]
    limits: Limits


class IngestionInfo(_Body):
    """The worker's other job, consuming the turns topic (issue #18: its own signal, not
    readiness)."""

    healthy: bool = Field(description="consuming its partitions (or a member with none to own): broker reachable, "
                                      "not paused, no partition stopped, not in a rebalance")
    state: Literal["consuming", "idle", "rebalancing", "paused", "store_full", "store_lost", "store_building",
                   "broker_unreachable", "partition_stopped", "stopping"]
    store: str = Field("ok", description="the memory-state store as this worker sees it (issue #17): ok, starting, "
                                         "unavailable, full, lost, building")
    store_problem: str | None = Field(None, description="why the store is lost or building, when it is")
    partitions: list[int]
    broker: str
    paused: bool
    stopped_partitions: list[dict[str, Any]]


class HealthResponse(_Body):
    status: Literal["ok"] = "ok"
    ingestion: IngestionInfo | None = None


# --------------------------------------------------------------------------- OpenAI models, TEI tokenize


class ModelCard(_Body):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "evostream"


class ModelList(_Body):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(_Body):
    """TEI `POST /tokenize`: the tokens the model reads for each input (the instruction prefix
    of a query is not shown)."""

    inputs: InputText | Annotated[list[InputText], Field(min_length=1)]
    add_special_tokens: bool = Field(True, description="true: the end-of-text token the model appends is shown")


class SimpleToken(_Body):
    id: int
    text: str
    special: bool
    start: int | None = Field(description="character offset in the input; null for a special token")
    stop: int | None


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
           "HealthResponse", "InfoResponse", "IngestionInfo", "InputType", "Limits", "MemoryExtension", "MemoryInfo",
           "ModelCard", "ModelList", "OpenAIError", "OpenAIErrorBody", "QueryRequest", "QueryResponse", "RerankHit",
           "RerankRequest", "SimpleToken", "TokenIds", "TokenizeRequest", "TruncationDirection", "UnknownConversation",
           "Usage"]
