"""The `evostream` command line explains itself (issue #11): every expected failure is ONE
`error:` line on stderr and a documented exit code, never a traceback (unless --debug).

Each test runs the real entry point (`python -m stream.cli`) as a subprocess, against real
services where the failure needs one (a real broker, a real Redis with a password), and checks
the line and the code. The codes are those of `stream.cli.errors.ExitCode`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from stream.cli.config import check_environment
from stream.cli.errors import CliError, ExitCode, redact
from devtools.localstack import find_redis_server
from tests.support.hubcache import put_checkpoint_dir
from tests.support.workers import REPO, free_port
from workers.tiny_checkpoint import cached_tiny_checkpoint


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVOSTREAM_") or k == "EVOSTREAM_CACHE_DIR"}
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", COLUMNS="120")
    env.update(extra)
    return env


def run_cli(*args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stream.cli", *args], cwd=REPO, env=_env(**env),
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def one_error(proc: subprocess.CompletedProcess, code: ExitCode, *fragments: str) -> str:
    """The single `error:` line of a failed command, after checking code and fragments."""
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    others = [line for line in proc.stderr.splitlines()
              if line and not line.startswith(("error:", "[evostream]", "warning:"))]
    assert not others, f"unexpected stderr lines: {others}"
    assert proc.returncode == int(code), (proc.returncode, proc.stderr)
    for f in fragments:
        assert f in errors[0], (f, errors[0])
    return errors[0]


def closed_port() -> int:
    return free_port()  # bound and released: nothing listens there


# ---------------------------------------------------------------------------------------------
# in-process units
def test_global_options_are_parsed_by_typer_anywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture) -> None:
    """`--config`/`--debug` before or after the command, parsed by typer/click (issue #21: no
    hand-written argv splitter); the settings file reaches the settings without the process
    environment being written."""
    from stream.cli import main

    monkeypatch.delenv("EVOSTREAM_CONFIG", raising=False)
    cfg = tmp_path / "a.toml"
    cfg.write_text("turns_partitions = 3\n")
    for argv in (["settings", "--config", str(cfg)], ["--config", str(cfg), "settings"],
                 [f"--config={cfg}", "settings", "--debug"], ["settings", "--debug", "--config", str(cfg)]):
        assert main(argv) == 0, argv
        assert json.loads(capsys.readouterr().out)["turns_partitions"] == 3, argv
        assert "EVOSTREAM_CONFIG" not in os.environ
    assert main(["settings"]) == 0  # the next call does not inherit the previous one's file
    assert json.loads(capsys.readouterr().out)["turns_partitions"] == 8
    assert main(["settings", "--config"]) == 2  # click: "Option '--config' requires an argument"
    assert "requires an argument" in capsys.readouterr().err


def test_unknown_variable_near_a_setting_is_refused_others_warned() -> None:
    with pytest.raises(CliError, match=r"unknown variable EVOSTREAM_TURN_TOPIC \(did you mean EVOSTREAM_TURNS_TOPIC\?\)"):
        check_environment({"EVOSTREAM_TURN_TOPIC": "x"})
    assert check_environment({"EVOSTREAM_TURNS_TOPIC": "x", "EVOSTREAM_CACHE_DIR": "/tmp",
                              "EVOSTREAM_FAULT_POINT": "p", "PATH": "/bin"}) == []
    warned = check_environment({"EVOSTREAM_SOMETHING_ELSE": "1"})
    assert len(warned) == 1 and "EVOSTREAM_SOMETHING_ELSE" in warned[0]


def test_passwords_are_redacted() -> None:
    assert redact("redis://user:s3cret@host:6379/0") == "redis://user:***@host:6379/0"
    assert redact("redis://:s3cret@host:6379/0") == "redis://:***@host:6379/0"
    assert redact("redis://host:6379/0") == "redis://host:6379/0"


# ---------------------------------------------------------------------------------------------
# the entry point
def test_version_and_help() -> None:
    p = run_cli("--version")
    assert p.returncode == 0 and p.stdout.startswith("evostream "), p
    p = run_cli("--help")
    assert p.returncode == 0
    for word in ("worker", "produce", "dead-letters", "Exit codes", "--config", "--debug"):
        assert word in p.stdout, word
    assert "<bool>" not in p.stdout  # flags are not shown as taking a value (issue #18: `--debug true`)
    p = run_cli("settings", "--help")
    assert p.returncode == 0 and "EVOSTREAM_KAFKA_BOOTSTRAP" in p.stdout and "EVOSTREAM_MODEL" in p.stdout


def test_usage_error_is_click_exit_2() -> None:
    p = run_cli("produce")
    assert p.returncode == 2 and "Traceback" not in p.stderr and "FILE" in p.stderr.upper()


def test_bad_setting_names_its_variable() -> None:
    line = one_error(run_cli("settings", EVOSTREAM_TURNS_PARTITIONS="many"), ExitCode.USAGE,
                     "EVOSTREAM_TURNS_PARTITIONS='many' is invalid", "valid integer")
    assert "turns_partitions" not in line.split("is invalid")[0]


def test_mistyped_variable_is_refused_with_did_you_mean() -> None:
    one_error(run_cli("settings", EVOSTREAM_REDIS_ULR="redis://x"), ExitCode.USAGE,
              "unknown variable EVOSTREAM_REDIS_ULR", "did you mean EVOSTREAM_REDIS_URL?")


def test_config_file_anywhere_missing_and_unknown_key(tmp_path: Path) -> None:
    cfg = tmp_path / "prod.toml"
    cfg.write_text('[evostream]\nturns_partitions = 3\nredis_namespace = "prod"\n')
    p = run_cli("settings", "--config", str(cfg))  # after the subcommand
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    assert got["turns_partitions"] == 3 and got["redis_namespace"] == "prod"
    p = run_cli("settings", "--config", str(cfg), EVOSTREAM_TURNS_PARTITIONS="5")  # the environment wins
    assert json.loads(p.stdout)["turns_partitions"] == 5
    one_error(run_cli("--config", str(tmp_path / "nope.yaml"), "settings"), ExitCode.USAGE,
              "nope.yaml: no such file")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"turn_partitions": 3}))
    one_error(run_cli("settings", "--config", str(bad)), ExitCode.USAGE,
              "unknown setting 'turn_partitions'", "did you mean 'turns_partitions'?")


def test_produce_without_broker() -> None:
    one_error(run_cli("produce", str(REPO / "data" / "sample_conversations.jsonl"),
                      EVOSTREAM_KAFKA_BOOTSTRAP=f"127.0.0.1:{closed_port()}"),
              ExitCode.BROKER, "cannot connect", "EVOSTREAM_KAFKA_BOOTSTRAP")


def test_worker_without_broker() -> None:
    one_error(run_cli("worker", EVOSTREAM_KAFKA_BOOTSTRAP=f"127.0.0.1:{closed_port()}", EVOSTREAM_API_AUTH="off",
                      EVOSTREAM_WEB_PORT=str(closed_port())),
              ExitCode.BROKER, "cannot connect", "EVOSTREAM_KAFKA_BOOTSTRAP")


def test_topics_without_broker() -> None:
    one_error(run_cli("topics", "--wait", "1", EVOSTREAM_KAFKA_BOOTSTRAP=f"127.0.0.1:{closed_port()}"),
              ExitCode.BROKER, "cannot reach the Kafka broker", "EVOSTREAM_KAFKA_BOOTSTRAP")


def test_inspect_without_redis() -> None:
    port = closed_port()
    t0 = time.monotonic()
    line = one_error(run_cli("inspect", "c1", EVOSTREAM_REDIS_URL=f"redis://:pw@127.0.0.1:{port}/0"),
                     ExitCode.REDIS, "cannot reach Redis at", "EVOSTREAM_REDIS_URL")
    assert "pw@" not in line  # the password is never printed
    assert time.monotonic() - t0 < 60


@pytest.fixture
def redis_with_password(tmp_path: Path):
    port = free_port()
    binary = find_redis_server(tmp_path)
    proc = subprocess.Popen([str(binary), "--port", str(port), "--bind", "127.0.0.1", "--requirepass", "right",
                             "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                redis.Redis(port=port, password="right").ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_wrong_redis_credentials(redis_with_password: int) -> None:
    line = one_error(run_cli("inspect", "c1", EVOSTREAM_REDIS_URL=f"redis://:wrong@127.0.0.1:{redis_with_password}/0"),
                     ExitCode.AUTH, "refused the credentials", "EVOSTREAM_REDIS_URL")
    assert "wrong" not in line
    # and with the right password the same command gets as far as the answer "no checkpoint"
    one_error(run_cli("inspect", "c1", EVOSTREAM_REDIS_URL=f"redis://:right@127.0.0.1:{redis_with_password}/0"),
              ExitCode.FAILED, "no checkpoint for conversation 'c1'")


def test_missing_model(tmp_path: Path) -> None:
    one_error(run_cli("inspect", "c1", EVOSTREAM_MODEL=str(tmp_path / "nowhere")), ExitCode.MODEL,
              "is not a model directory", "EVOSTREAM_MODEL=")


def test_worker_with_invalid_checkpoint(tmp_path: Path, kafka_bootstrap: str, topic_factory) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "bert"}))
    turns, emb, dl = topic_factory(1), topic_factory(1), topic_factory(1)
    one_error(run_cli("worker", EVOSTREAM_KAFKA_BOOTSTRAP=kafka_bootstrap, EVOSTREAM_MODEL=str(bad),
                      EVOSTREAM_TURNS_TOPIC=turns, EVOSTREAM_EMBEDDINGS_TOPIC=emb, EVOSTREAM_DEAD_LETTER_TOPIC=dl,
                      EVOSTREAM_TURNS_PARTITIONS="1", EVOSTREAM_API_AUTH="off", EVOSTREAM_WEB_PORT=str(closed_port())),
              ExitCode.MODEL, "model:", "model_type 'bert', expected 'EvoRAG'")


def test_checkpoint_hub_id_not_cached(tmp_path: Path) -> None:
    one_error(run_cli("inspect", "c1", EVOSTREAM_MODEL="MiG-NJU/EvoEmbedding-0.8B",
                      HF_HUB_CACHE=str(tmp_path / "empty-cache")),
              ExitCode.MODEL, "'MiG-NJU/EvoEmbedding-0.8B' is not available", "HF_HUB_OFFLINE is set")


def test_checkpoint_hub_id_from_offline_cache(tmp_path: Path, redis_url: str) -> None:
    cache = tmp_path / "hub"
    put_checkpoint_dir(cache, "MiG-NJU/EvoEmbedding-0.8B", cached_tiny_checkpoint("qwen3", "tiny"))
    # resolved from the cache: the command gets as far as Redis and answers "no checkpoint"
    p = run_cli("inspect", "never-seen", EVOSTREAM_MODEL="MiG-NJU/EvoEmbedding-0.8B",
                HF_HUB_CACHE=str(cache), EVOSTREAM_REDIS_URL=redis_url)
    one_error(p, ExitCode.FAILED, "no checkpoint for conversation 'never-seen'")
    assert "resolving model MiG-NJU/EvoEmbedding-0.8B through the hub cache" in p.stderr


def test_worker_unreachable() -> None:
    one_error(run_cli("query", "-c", "c1", "-t", "hi", "--url", f"http://127.0.0.1:{closed_port()}"),
              ExitCode.WORKER, "cannot reach the evostream worker", "connection refused")


def test_debug_shows_the_traceback() -> None:
    p = run_cli("--debug", "settings", EVOSTREAM_TURNS_PARTITIONS="many")
    assert p.returncode == int(ExitCode.USAGE)
    assert "Traceback" in p.stderr and "error: EVOSTREAM_TURNS_PARTITIONS" in p.stderr


def test_reset_needs_yes_and_says_when_nothing_is_stored(redis_url: str) -> None:
    one_error(run_cli("reset", "c-none", EVOSTREAM_REDIS_URL=redis_url), ExitCode.USAGE, "rerun with --yes")
    one_error(run_cli("reset", "c-none", "--tenant", "acme", "--yes", EVOSTREAM_REDIS_URL=redis_url,
                      EVOSTREAM_REDIS_NAMESPACE="t-reset"),
              ExitCode.FAILED, "nothing stored for conversation acme/c-none")


def test_settings_output_masks_secrets() -> None:
    p = run_cli("settings", EVOSTREAM_API_KEYS='{"k-secret-1-0123456789": ["acme"]}',
                EVOSTREAM_REDIS_URL="redis://:pw-secret@127.0.0.1:1/0", EVOSTREAM_KAFKA_SASL_PASSWORD="sasl-secret")
    assert p.returncode == 0, p.stderr
    assert "secret" not in p.stdout
    got = json.loads(p.stdout)
    assert got["api_keys"] == "***" and got["redis_url"] == "redis://:***@127.0.0.1:1/0"


def test_every_setting_is_explained_in_settings_help() -> None:
    from stream.cli.config import settings_help, setting_variables

    entries = settings_help().split("\n\n")
    assert len(entries) == len(setting_variables())
    for entry in entries:
        var, _, rest = entry.partition(" = ")
        assert var in setting_variables(), entry
        default, _, meaning = rest.partition(". ")
        assert meaning.strip(), f"{var} has no explanation in `evostream settings --help`"


def test_devtools_commands_say_they_need_a_checkout_when_devtools_is_absent() -> None:
    """`evostream demo`/`stack` from an installed wheel (no devtools/): one `error:` line with
    the usage exit code, not a ModuleNotFoundError traceback (issue #21)."""
    import pytest

    from stream.cli.core import _devtool
    from stream.cli.errors import CliError, ExitCode

    with pytest.raises(CliError, match="source checkout") as err:
        _devtool("devtools.not_shipped_in_the_wheel", "main", "stack")
    assert err.value.code == ExitCode.USAGE
    # present in a checkout: the real entry point comes back
    assert callable(_devtool("devtools.localstack", "main", "stack"))
