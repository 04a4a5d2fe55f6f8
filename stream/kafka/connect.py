"""Kafka Connect conventions of the embeddings topic (issue #19), applied as records leave.

Users who index with Kafka Connect (a JDBC or Elasticsearch/OpenSearch sink) instead of
`evostream sink` need three things the default records do not give them:

* a per-turn document id. The record key is the conversation id (it keeps a conversation's
  events on one partition, in order), so a sink that uses the key as the document id keeps ONE
  document per conversation and overwrites it every turn. Every embedding event therefore
  carries `document_id` as a field (schemas/events.py) and, here, as the header
  `evostream.document_id`, for sinks or transforms that read ids from headers.
* plain float arrays (`EVOSTREAM_OUTPUT_VECTOR_FORMAT=floats`): connectors map a JSON array of
  numbers onto an array / dense_vector column; they cannot decode our base64 form.
* the Kafka tombstone (`EVOSTREAM_OUTPUT_TOMBSTONES=null|both`): a null-value record keyed by
  the conversation id is what sinks with delete support (`delete.enabled`,
  `behavior.on.null.values=delete`) and log compaction understand. It carries the headers
  `evostream.type: conversation_deleted` and `evostream.tenant` (absent: the default tenant)
  so that `evostream sink` can still scope the delete by tenant.

The transformation is a pure function of the record, so a record re-emitted from the
checkpoint outbox (the same bytes) leaves as the same record: downstream copies stay identical.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from schemas.events import document_id

if TYPE_CHECKING:
    from stream.kafka.emitter import OutMessage

HEADER_DOCUMENT_ID = "evostream.document_id"
HEADER_TYPE = "evostream.type"
HEADER_TENANT = "evostream.tenant"
HEADER_DELETED_THROUGH = "evostream.deleted_through_seq"


@dataclass(frozen=True)
class ConnectConventions:
    """How embeddings-topic records are shaped on the way out (see the module doc)."""

    embeddings_topic: str
    document_id_header: bool = True
    vector_format: str = "encoded"      # "encoded" | "floats"
    tombstones: str = "event"           # "event" | "null" | "both"

    @classmethod
    def from_settings(cls, s: Any) -> "ConnectConventions":
        return cls(embeddings_topic=s.embeddings_topic, document_id_header=s.output_document_id_header,
                   vector_format=s.output_vector_format, tombstones=s.output_tombstones)

    @property
    def identity(self) -> bool:
        """True when records leave exactly as the pipeline made them."""
        return not self.document_id_header and self.vector_format == "encoded" and self.tombstones == "event"

    def apply(self, messages: list["OutMessage"]) -> list["OutMessage"]:
        if self.identity:
            return messages
        out: list[OutMessage] = []
        for m in messages:
            out.extend(self.shape(m))
        return out

    def shape(self, m: "OutMessage") -> list["OutMessage"]:
        """The record(s) to send for one pipeline message (one, or two for tombstones=both)."""
        if m.topic != self.embeddings_topic or m.value is None:
            return [m]
        try:
            obj = json.loads(m.value)
        except ValueError:
            return [m]  # not ours to judge: sent as it is
        kind = obj.get("type") if isinstance(obj, dict) else None
        if kind == "embedding":
            return [self._embedding(m, obj)]
        if kind == "conversation_deleted":
            return self._tombstone(m, obj)
        return [m]

    def _embedding(self, m: "OutMessage", obj: dict) -> "OutMessage":
        headers = list(m.headers)
        if self.document_id_header:
            doc = obj.get("document_id") or document_id(obj.get("tenant"), obj["conversation_id"],
                                                        int(obj.get("generation", 1)), int(obj["seq"]))
            headers.append((HEADER_DOCUMENT_ID, str(doc).encode()))
        value = m.value
        if self.vector_format == "floats" and isinstance(obj.get("vector"), dict):
            from schemas.vectors import EncodedVector, decode_vector

            obj["vector"] = [float(x) for x in decode_vector(EncodedVector.model_validate(obj["vector"]))]
            value = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
        return replace(m, value=value, headers=tuple(headers))

    def _tombstone(self, m: "OutMessage", obj: dict) -> list["OutMessage"]:
        if self.tombstones == "event":
            return [m]
        headers = [(HEADER_TYPE, b"conversation_deleted")]
        if obj.get("tenant") is not None:
            headers.append((HEADER_TENANT, str(obj["tenant"]).encode()))
        if obj.get("deleted_through_seq") is not None:
            headers.append((HEADER_DELETED_THROUGH, str(obj["deleted_through_seq"]).encode()))
        null = replace(m, value=None, headers=tuple(headers))
        return [null] if self.tombstones == "null" else [m, null]


__all__ = ["ConnectConventions", "HEADER_DELETED_THROUGH", "HEADER_DOCUMENT_ID", "HEADER_TENANT", "HEADER_TYPE"]
