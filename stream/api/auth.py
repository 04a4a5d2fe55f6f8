"""API keys, each bound to the tenants whose conversations it may read.

Keys come from the `api_keys` setting (a secret string holding JSON) and/or a JSON file
(`api_keys_file`), both shaped `{"<key>": ["tenant-a", "tenant-b"]}` (or one name instead of
the list); `null` is the default tenant (turns that carry no tenant) and `"*"` is every tenant.
Keys are kept as SHA-256 digests and compared in constant time, so neither a memory dump of the
table nor response timing tells a key.

Authentication is on unless `api_auth = "off"` is configured explicitly (the local demo and
tests do so). With it on and no key configured a worker refuses to start (`Settings.
serving_problem`); a table built without keys anyway refuses every protected request -- a
misconfigured deployment fails closed, not open.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass

from stream.api.errors import forbidden, unauthorized
from stream.settings import ALL_TENANTS, parse_api_keys, read_api_keys_file


@dataclass(frozen=True)
class Principal:
    """Who is asking: the tenants they may read (`all_tenants` for a `"*"` key or auth off)."""

    name: str
    tenants: frozenset[str | None]
    all_tenants: bool = False

    def resolve_tenant(self, requested: str | None) -> str | None:
        """The tenant a request addresses: the one it names (if this principal may read it),
        else the principal's only tenant, else the default tenant (None)."""
        if requested is not None:
            if not (self.all_tenants or requested in self.tenants):
                raise forbidden("this API key may not read that tenant's conversations")
            return requested
        if not self.all_tenants and len(self.tenants) == 1:
            return next(iter(self.tenants))
        if not (self.all_tenants or None in self.tenants):
            raise forbidden("this API key is bound to several tenants: name one in 'tenant'")
        return None


LOCAL = Principal("local (auth off)", frozenset(), all_tenants=True)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class KeyTable:
    def __init__(self, table: dict[str, list[str | None]], *, required: bool):
        self.required = required
        self._by_digest: dict[bytes, Principal] = {}
        for i, (key, tenants) in enumerate(sorted(table.items())):
            every = ALL_TENANTS in tenants
            self._by_digest[_digest(key)] = Principal(
                name=f"key#{i}", tenants=frozenset(t for t in tenants if t != ALL_TENANTS), all_tenants=every)

    @classmethod
    def from_settings(cls, settings: object) -> "KeyTable":
        """The table of validated settings (stream/settings.py checks keys and the keys file
        when the settings are read); objects without `api_key_table` are parsed here."""
        if hasattr(settings, "api_key_table"):
            table = settings.api_key_table()
        else:
            table = {}
            raw = getattr(settings, "api_keys", None)
            if raw is not None:
                text = raw.get_secret_value() if hasattr(raw, "get_secret_value") else raw
                try:
                    parsed = json.loads(text) if isinstance(text, str) else text
                except ValueError:
                    raise ValueError("EVOSTREAM_API_KEYS: not valid JSON") from None  # never quote a secret
                table = parse_api_keys(parsed, "EVOSTREAM_API_KEYS")
            path = getattr(settings, "api_keys_file", None)
            if path:
                table.update(read_api_keys_file(str(path)))
        return cls(table, required=getattr(settings, "api_auth", "required") != "off")

    def __len__(self) -> int:
        return len(self._by_digest)

    def authenticate(self, authorization: str | None) -> Principal:
        """The principal of an `Authorization: Bearer <key>` header (401 when missing/unknown)."""
        if not self.required:
            return LOCAL
        if not authorization or not authorization[:7].lower() == "bearer ":
            raise unauthorized()
        presented = _digest(authorization[7:].strip())
        found: Principal | None = None
        for digest, principal in self._by_digest.items():  # constant time per entry, no early exit
            if hmac.compare_digest(digest, presented):
                found = principal
        if found is None:
            raise unauthorized()
        return found
