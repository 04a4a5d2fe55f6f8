"""API keys and tenant resolution in isolation (stream/api/auth.py); the live checks (401/403
over HTTP, one key never reading another tenant's conversation) are in tests/test_api.py."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from stream.api.auth import KeyTable
from stream.api.errors import ApiError


def _settings(tmp_path, keys=None, file_keys=None, auth="required"):
    path = None
    if file_keys is not None:
        path = tmp_path / "keys.json"
        path.write_text(json.dumps(file_keys))
    return SimpleNamespace(api_keys=keys or {}, api_keys_file=str(path) if path else None, api_auth=auth)


def test_keys_from_settings_and_file_bind_tenants(tmp_path) -> None:
    table = KeyTable.from_settings(_settings(tmp_path, {"k-acme-000000000000": ["acme"]},
                                             {"k-multi-00000000000": ["a", "b", None], "k-admin-00000000000": ["*"]}))
    assert len(table) == 3
    acme = table.authenticate("Bearer k-acme-000000000000")
    assert acme.resolve_tenant(None) == "acme" and acme.resolve_tenant("acme") == "acme"
    with pytest.raises(ApiError) as e:
        acme.resolve_tenant("globex")
    assert e.value.status == 403
    multi = table.authenticate("bearer  k-multi-00000000000 ")
    assert multi.resolve_tenant("b") == "b" and multi.resolve_tenant(None) is None  # null: the default tenant
    admin = table.authenticate("Bearer k-admin-00000000000")
    assert admin.resolve_tenant("anyone") == "anyone" and admin.resolve_tenant(None) is None


def test_a_key_bound_to_several_tenants_must_name_one(tmp_path) -> None:
    table = KeyTable.from_settings(_settings(tmp_path, {"k-two-0000000000000": ["a", "b"]}))
    with pytest.raises(ApiError) as e:
        table.authenticate("Bearer k-two-0000000000000").resolve_tenant(None)
    assert e.value.status == 403


@pytest.mark.parametrize("header", [None, "", "Basic abc", "Bearer", "Bearer wrong-key-0000000000"])
def test_missing_or_unknown_key_is_401(tmp_path, header) -> None:
    table = KeyTable.from_settings(_settings(tmp_path, {"k-acme-000000000000": ["acme"]}))
    with pytest.raises(ApiError) as e:
        table.authenticate(header)
    assert e.value.status == 401 and e.value.headers["WWW-Authenticate"] == "Bearer"


def test_no_keys_configured_fails_closed_and_off_must_be_explicit(tmp_path) -> None:
    with pytest.raises(ApiError):
        KeyTable.from_settings(_settings(tmp_path)).authenticate("Bearer anything-at-all-000")
    local = KeyTable.from_settings(_settings(tmp_path, auth="off")).authenticate(None)
    assert local.resolve_tenant("x") == "x" and local.resolve_tenant(None) is None


@pytest.mark.parametrize("bad, message", [
    ({"short": ["a"]}, "API keys must be at least 16 characters"),
    ({"k-acme-000000000000": []}, "needs a tenant name, a list of them"),
    ({"k-acme-000000000000": [""]}, "needs a tenant name, a list of them"),
    ({"k-acme-000000000000": 5}, "needs a tenant name, a list of them"),  # one name alone is fine (#18)
    (["k"], "expected a JSON object"),
])
def test_malformed_key_tables_are_refused(tmp_path, bad, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        KeyTable.from_settings(_settings(tmp_path, file_keys=bad))


def test_default_settings_require_keys() -> None:
    from stream.settings import Settings

    assert Settings().api_auth == "required"


def test_keys_setting_is_a_secret_json_string(monkeypatch) -> None:
    from stream.settings import Settings

    monkeypatch.setenv("EVOSTREAM_API_KEYS", json.dumps({"k-env-0000000000000": ["acme"]}))
    s = Settings()
    assert "k-env" not in repr(s) and "k-env" not in s.model_dump_json()
    assert KeyTable.from_settings(s).authenticate("Bearer k-env-0000000000000").resolve_tenant(None) == "acme"
    monkeypatch.setenv("EVOSTREAM_API_KEYS", "{not json k-secret-0000000")
    with pytest.raises(ValueError, match="not valid JSON") as e:
        KeyTable.from_settings(Settings())
    assert "k-secret" not in str(e.value)
