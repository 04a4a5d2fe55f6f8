"""Counting what the tolerant reader accepted without reading it (issue #13).

Accepting unknown fields and roles is only safe if it is visible: a producer that renamed a
field (`metdata`) must show up somewhere other than as silently missing data. Each inbound
event is passed to `InputShapes.observe`, which counts unknown fields and messages of roles
the model does not read, and logs the first occurrence of each unknown field name.

Names are logged as a digest, never verbatim (issue #17): a name is producer input like any
value, and a secret used as a key by mistake (a token pasted into the wrong place) would
otherwise be written to the log. `name_digest(name)` gives the same 12 hex digits for a
suspected name (`evostream` operators compare it with the log line), with the name's length.
"""

from __future__ import annotations

import hashlib
import logging
import threading

from prometheus_client import CollectorRegistry, Counter

from schemas.events import ConversationDelete, TurnEvent

log = logging.getLogger(__name__)

_MAX_NAMES_LOGGED = 256
"""Distinct unknown field names logged once each (bounded: names come from producers)."""


class InputShapes:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.unknown_fields = Counter(
            "evostream_input_unknown_fields_total",
            "fields of inbound events this version does not know (accepted, kept on the event)",
            ["level"], registry=registry)
        self.unread_messages = Counter(
            "evostream_input_unread_messages_total",
            "inbound messages of roles the model does not read (system, developer, tool, function)",
            ["role"], registry=registry)
        self.without_text = Counter(
            "evostream_turns_without_text_total",
            "turns with no user/assistant text (e.g. only a system prompt): acknowledged, not embedded",
            registry=registry)
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def observe(self, event: TurnEvent | ConversationDelete) -> None:
        names = event.unknown_fields
        if names:
            top = sum(1 for n in names if not n.startswith("messages["))
            if top:
                self.unknown_fields.labels(level="event").inc(top)
            if len(names) > top:
                self.unknown_fields.labels(level="message").inc(len(names) - top)
            self._log_new(event, names)
        if isinstance(event, TurnEvent):
            for role in event.unread_roles:
                self.unread_messages.labels(role=role).inc()

    def turn_without_text(self, event: TurnEvent) -> None:
        self.without_text.inc()
        log.info("turn %s/%d has no user/assistant text (roles %s): acknowledged, not embedded",
                 event.conversation_id, event.seq, [m.role for m in event.messages])

    @staticmethod
    def name_digest(name: str) -> str:
        """How an unknown field name appears in the log: 12 hex digits of its SHA-256."""
        return hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:12]

    def _log_new(self, event: TurnEvent | ConversationDelete, names: tuple[str, ...]) -> None:
        generic = {(n.split("].", 1)[-1], True) if n.startswith("messages[") else (n, False) for n in names}
        with self._lock:
            new = sorted(g for g in generic if g[0] not in self._seen)
            if not new or len(self._seen) >= _MAX_NAMES_LOGGED:
                return
            self._seen.update(n for n, _ in new)
        shown = [f"{'message.' if nested else ''}sha256:{self.name_digest(n)} ({len(n)} chars)" for n, nested in new]
        log.warning("inbound %s events carry %d field name(s) this version does not know: %s (names are logged "
                    "as SHA-256 prefixes, never verbatim; accepted and kept; set EVOSTREAM_INPUT_STRICT=true to "
                    "dead-letter them instead)", event.type, len(new), ", ".join(shown))


__all__ = ["InputShapes"]
