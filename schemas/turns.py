"""The unit the engine consumes: one conversation turn (a user message and the reply to it).

Kept separate from the wire event so that the engine does not depend on transport details
(timestamps, tenants, metadata) and the wire format can evolve without touching the model.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["user", "assistant"]
    content: str


class TurnInput(BaseModel):
    """One turn of one conversation. `seq` numbers the conversation's turns from 0."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    conversation_id: str = Field(min_length=1, max_length=256)
    seq: int = Field(ge=0, le=2**53)
    messages: list[ChatMessage] = Field(min_length=1, max_length=2)

    @model_validator(mode="after")
    def _user_then_assistant(self) -> "TurnInput":
        roles = [m.role for m in self.messages]
        if roles not in (["user"], ["assistant"], ["user", "assistant"]):
            raise ValueError(
                f"a turn is one user message and/or the assistant reply to it, in that order; got roles {roles}"
            )
        if not any(m.content.strip() for m in self.messages):
            raise ValueError("empty turn: every message of the turn is empty")
        return self

    @property
    def user(self) -> str:
        return next((m.content for m in self.messages if m.role == "user"), "")

    @property
    def assistant(self) -> str:
        return next((m.content for m in self.messages if m.role == "assistant"), "")
