"""Configuration fails early and in one line (issue #18 item 1, issue #21 names).

Every setting that names something (API keys, the files settings point at, URLs) is checked
when the settings are read: `evostream settings` and `evostream worker` refuse the same bad
configuration with one `error:` line and exit 2, and the worker does so before it loads the
model (before, these crashed the worker after the model had loaded, exit 70 "unexpected
error ... please report it", and `evostream settings` accepted them). Each case runs the real
entry point as a subprocess.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stream.cli.errors import ExitCode
from tests.test_cli import closed_port, one_error, run_cli

GOOD_KEY = "sk-0123456789abcdef0123"


def _bad_configurations(tmp: Path) -> list[tuple[str, dict[str, str], str]]:
    empty = tmp / "empty.json"
    empty.write_text("")
    not_json = tmp / "keys.txt"
    not_json.write_text("sk-plain-text-key-not-json")
    return [
        ("keys file missing", {"EVOSTREAM_API_KEYS_FILE": str(tmp / "absent.json")}, "EVOSTREAM_API_KEYS_FILE"),
        ("keys file empty", {"EVOSTREAM_API_KEYS_FILE": str(empty)}, "is empty"),
        ("keys file not JSON", {"EVOSTREAM_API_KEYS_FILE": str(not_json)}, "not valid JSON"),
        ("short key", {"EVOSTREAM_API_KEYS": json.dumps({"sk-short": ["acme"]})}, "at least 16 characters"),
        ("keys not JSON", {"EVOSTREAM_API_KEYS": "{sk-0123456789abcdef0123: acme"}, "not valid JSON"),
        ("tenant of the wrong type", {"EVOSTREAM_API_KEYS": json.dumps({GOOD_KEY: 5})}, "EVOSTREAM_API_KEYS"),
        ("redis url over http", {"EVOSTREAM_REDIS_URL": "http://127.0.0.1:6379/0"}, "EVOSTREAM_REDIS_URL"),
        ("kafka bootstrap as a URL", {"EVOSTREAM_KAFKA_BOOTSTRAP": "kafka://127.0.0.1:9092"},
         "EVOSTREAM_KAFKA_BOOTSTRAP"),
        ("password file missing", {"EVOSTREAM_REDIS_PASSWORD_FILE": str(tmp / "no-password")},
         "EVOSTREAM_REDIS_PASSWORD_FILE"),
    ]


CASES = ["keys file missing", "keys file empty", "keys file not JSON", "short key", "keys not JSON",
         "tenant of the wrong type", "redis url over http", "kafka bootstrap as a URL", "password file missing"]


@pytest.mark.parametrize("case", CASES)
def test_settings_command_refuses_bad_configuration(case: str, tmp_path: Path) -> None:
    env, fragment = next((e, f) for name, e, f in _bad_configurations(tmp_path) if name == case)
    line = one_error(run_cli("settings", **env), ExitCode.USAGE, fragment)
    assert "sk-0123456789abcdef0123" not in line and "sk-plain-text" not in line  # secrets are never printed


def test_worker_refuses_bad_configuration_before_loading_the_model(tmp_path: Path, kafka_bootstrap: str,
                                                                    topic_factory) -> None:
    """With a reachable broker and its topics in place, the old worker got as far as loading
    the model and then died with exit 70; now the settings stop it first."""
    turns, emb, dl = topic_factory(1), topic_factory(1), topic_factory(1)
    topics = dict(EVOSTREAM_KAFKA_BOOTSTRAP=kafka_bootstrap, EVOSTREAM_TURNS_TOPIC=turns,
                  EVOSTREAM_EMBEDDINGS_TOPIC=emb, EVOSTREAM_DEAD_LETTER_TOPIC=dl, EVOSTREAM_TURNS_PARTITIONS="1",
                  EVOSTREAM_WEB_PORT=str(closed_port()))
    for env in ({"EVOSTREAM_API_KEYS_FILE": str(tmp_path / "absent.json")},
                {"EVOSTREAM_API_KEYS": json.dumps({GOOD_KEY: ["acme"]}), "EVOSTREAM_REDIS_URL": "http://127.0.0.1:1/0"}):
        p = run_cli("worker", **topics, **env, timeout=180)
        one_error(p, ExitCode.USAGE)
        assert "loading model" not in p.stderr, p.stderr


def test_worker_with_auth_on_and_no_keys_refuses_to_start() -> None:
    """No key configured and authentication on: every query would get 401. The worker says so
    and stops (exit 2) instead of starting silently; `evostream settings` warns."""
    p = run_cli("worker", EVOSTREAM_KAFKA_BOOTSTRAP=f"127.0.0.1:{closed_port()}", timeout=120)
    one_error(p, ExitCode.USAGE, "no API keys", "EVOSTREAM_API_KEYS", "EVOSTREAM_API_AUTH=off")
    p = run_cli("settings")
    assert p.returncode == 0, p.stderr
    assert any(line.startswith("warning:") and "no API keys" in line for line in p.stderr.splitlines()), p.stderr


@pytest.mark.parametrize("keys, tenant, allowed", [
    ({GOOD_KEY: "*"}, "anyone", True),           # a bare "*" is every tenant, as the README always said
    ({GOOD_KEY: ["*"]}, "anyone", True),
    ({GOOD_KEY: "acme"}, "acme", True),          # a bare name is that one tenant
    ({GOOD_KEY: "acme"}, "globex", False),
    ({GOOD_KEY: None}, None, True),              # null alone: the default tenant
])
def test_key_tenants_may_be_one_name_star_or_null(keys: dict, tenant: str | None, allowed: bool) -> None:
    from types import SimpleNamespace

    from stream.api.auth import KeyTable
    from stream.api.errors import ApiError

    table = KeyTable.from_settings(SimpleNamespace(api_keys=json.dumps(keys), api_keys_file=None, api_auth="required"))
    principal = table.authenticate(f"Bearer {GOOD_KEY}")
    if allowed:
        assert principal.resolve_tenant(tenant) == tenant
    else:
        with pytest.raises(ApiError):
            principal.resolve_tenant(tenant)


def test_star_key_is_accepted_by_settings() -> None:
    p = run_cli("settings", EVOSTREAM_API_KEYS=json.dumps({GOOD_KEY: "*"}))
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["api_keys"] == "***"


# --------------------------------------------------------------------------------------------- names (#21)


def test_model_setting_and_its_deprecated_checkpoint_aliases(tmp_path: Path) -> None:
    """The model's weights are `model` (EVOSTREAM_MODEL); EVOSTREAM_CHECKPOINT and
    EVOSTREAM_CHECKPOINT_REVISION still work, each with one deprecation line."""
    p = run_cli("settings", EVOSTREAM_MODEL="/models/evo", EVOSTREAM_MODEL_REVISION="v1")
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    assert (got["model"], got["model_revision"]) == ("/models/evo", "v1")
    assert "deprecated" not in p.stderr
    p = run_cli("settings", EVOSTREAM_CHECKPOINT="/models/old", EVOSTREAM_CHECKPOINT_REVISION="v0")
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    assert (got["model"], got["model_revision"]) == ("/models/old", "v0")
    lines = [line for line in p.stderr.splitlines() if "deprecated" in line]
    assert lines == ["warning: EVOSTREAM_CHECKPOINT is deprecated: use EVOSTREAM_MODEL",
                     "warning: EVOSTREAM_CHECKPOINT_REVISION is deprecated: use EVOSTREAM_MODEL_REVISION"], p.stderr
    # the new name wins over the old one
    p = run_cli("settings", EVOSTREAM_MODEL="/models/new", EVOSTREAM_CHECKPOINT="/models/old")
    assert json.loads(p.stdout)["model"] == "/models/new"
    # and in a settings file
    cfg = tmp_path / "s.toml"
    cfg.write_text('checkpoint = "/models/file"\n')
    p = run_cli("settings", "--config", str(cfg))
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["model"] == "/models/file"
    assert "'checkpoint' is deprecated: use 'model'" in p.stderr
