"""Chat messages as producers publish them, and what the model sees of each.

Why a wire type separate from `schemas.turns.ChatMessage`: chat platforms publish messages in
the shapes of the common chat APIs (OpenAI-style `name`, `tool_calls`, `tool_call_id`,
content as a list of typed parts; roles `system`, `developer`, `tool`, `function`). The
engine, however, only ever reads what EvoEmbedding was trained on (MODEL_SPEC.md, "What a
turn is"): one user message and the assistant reply to it, rendered as ChatML user/assistant
turns. This module is the one place that maps the first onto the second:

| wire | memory + embedding see |
|---|---|
| `user` content | the user side of the turn (several user messages: joined by "\\n") |
| `assistant` content | the assistant side (several: joined by "\\n") |
| `assistant.tool_calls`, `name`, `tool_call_id` | nothing (the model never saw them) |
| `system`, `developer` | nothing: instructions to the assistant, not conversation; one system prompt repeated in every conversation would otherwise fill every memory with the same text |
| `tool`, `function` (tool results) | nothing: machine output in no trained rendering |
| content parts `{"type":"text","text":...}` | their text, joined by "\\n"; other part types (images, audio): nothing |

Unknown fields on a message are accepted and kept (`model_extra`); `stream.processing.decode` counts them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

MAX_MESSAGES_PER_TURN = 64
MAX_NAME_CHARS = 256

CONVERSATION_ROLES: frozenset[str] = frozenset({"user", "assistant"})
"""Roles the model reads (MODEL_SPEC: trained on user/assistant ChatML turns)."""
CONTEXT_ROLES: frozenset[str] = frozenset({"system", "developer", "tool", "function"})
"""Roles accepted on the wire and kept on the event, but not read by the model."""
Role = Literal["user", "assistant", "system", "developer", "tool", "function"]

_OPTIONAL_WIRE_FIELDS = ("name", "tool_calls", "tool_call_id")


class ContentPart(BaseModel):
    """One part of a multi-part content (OpenAI-style). Only `text` parts are read."""

    model_config = ConfigDict(extra="allow", frozen=True)

    type: Annotated[str, Field(min_length=1, max_length=64)]
    text: str | None = None


class WireMessage(BaseModel):
    """A chat message in any of the common chat formats.

    `content` is a string, a list of content parts, or null (an assistant message that only
    calls tools). Serialised without the optional OpenAI fields when they are unset, so an
    event built from plain user/assistant messages has exactly the version-1 bytes.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    role: Role
    content: str | list[ContentPart] | None
    name: Annotated[str, Field(max_length=MAX_NAME_CHARS)] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: Annotated[str, Field(max_length=MAX_NAME_CHARS)] | None = None

    @model_serializer(mode="wrap")
    def _omit_unset_optionals(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        for name in _OPTIONAL_WIRE_FIELDS:
            if data.get(name) is None:
                data.pop(name, None)
        return data

    @property
    def text(self) -> str:
        """What of this message's content is text (parts joined by a newline)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text for p in self.content if p.type == "text" and p.text is not None)

    @property
    def read_by_model(self) -> bool:
        return self.role in CONVERSATION_ROLES

    @property
    def unknown_fields(self) -> tuple[str, ...]:
        # Content parts' own fields (image_url, input_audio, ...) belong to their part type:
        # not counted as unknown.
        return tuple(self.model_extra or ())


__all__ = ["CONTEXT_ROLES", "CONVERSATION_ROLES", "ContentPart", "MAX_MESSAGES_PER_TURN", "Role", "WireMessage"]
