"""How long a conversation's memory state and its marker live in Redis.

Idle conversations expire as a whole (the four state keys' TTL is refreshed by every commit);
the marker outlives the state by `marker_ttl_s`, so an expired conversation is told apart from
a new one (`memory: reset_after_expiry`) and from a seq gap. A tenant may have its own idle TTL
(issue #14); the marker of an ended conversation (delete, reset) lives `marker_ttl_s` alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TtlPolicy:
    ttl_s: float | None = 7 * 24 * 3600  # None: never expire
    marker_ttl_s: float | None = 30 * 24 * 3600
    by_tenant: dict[str, float | None] = field(default_factory=dict)  # "" names the default tenant

    def __post_init__(self) -> None:
        if self.ttl_s is not None and self.ttl_s <= 0:
            raise ValueError("ttl_s must be positive or None")
        if self.marker_ttl_s is not None and self.marker_ttl_s <= 0:
            raise ValueError("marker_ttl_s must be positive or None")
        for t, v in self.by_tenant.items():
            if v is not None and v <= 0:
                raise ValueError(f"ttl_by_tenant[{t!r}] must be positive or None")

    def ttl_for(self, tenant: str | None) -> float | None:
        """Idle TTL of a tenant's conversations."""
        return self.by_tenant.get(tenant or "", self.ttl_s)

    def state_ms(self, tenant: str | None = None) -> int:
        """PEXPIRE argument for the state keys (0 = persist)."""
        ttl = self.ttl_for(tenant)
        return 0 if ttl is None else max(1, round(ttl * 1000))

    def marker_ms(self, ending: bool = False, tenant: str | None = None) -> int:
        """A live marker outlives the state by marker_ttl_s; a tombstone lives marker_ttl_s."""
        ttl = self.ttl_for(tenant)
        if self.marker_ttl_s is None or (ttl is None and not ending):
            return 0
        extra = 0 if ending else ttl or 0
        return max(1, round((self.marker_ttl_s + extra) * 1000))
