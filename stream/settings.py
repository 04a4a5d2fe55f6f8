"""All worker settings in one validated object: environment (EVOSTREAM_*), then an optional
config file (JSON/TOML/YAML, named by EVOSTREAM_CONFIG or --config), then defaults.

The defaults are the embedded local setup (tansu broker + local Redis + tiny model);
production overrides broker, Redis, model, device and the idempotent producer.

Why everything that names something is checked here (issue #18): a bad API-key table, a
secret file that is not there or a Redis URL with the wrong scheme used to surface deep inside
the worker, after the model had loaded, as "unexpected error" (exit 70) -- a crash loop under a
restart policy. Validated in the model, the same mistake is one line and exit 2 from
`evostream settings` and from every command, before any connection or model load.
"""

from __future__ import annotations

import json
import os
import socket
from contextvars import ContextVar
from enum import Enum
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    JsonConfigSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)


class GapPolicy(str, Enum):
    APPLY = "apply"              # apply the turn, log a warning, count it
    DEAD_LETTER = "dead_letter"  # refuse gapped turns, up to GAP_MAX_DEAD_LETTERS per conversation


class Durability(str, Enum):
    """What must hold for a checkpoint commit before the input offsets are acknowledged."""

    REPLY = "reply"  # Redis replied: in its memory; a crash within its fsync window loses it
    AOF = "aof"  # WAITAOF: fsynced to the local append-only file
    REPLICAS = "replicas"  # WAIT: received by `redis_durability_replicas` replicas
    AOF_AND_REPLICAS = "aof+replicas"


#: The variable naming the settings file (not a setting itself: it says where settings live).
CONFIG_ENV = "EVOSTREAM_CONFIG"
#: A settings file may hold its keys at the top level or under this table/section.
CONFIG_SECTION = "evostream"


#: The settings file given on the command line (`evostream --config FILE`): it wins over
#: EVOSTREAM_CONFIG without writing the process environment (issue #21).
CONFIG_FILE: ContextVar[str | None] = ContextVar("evostream_config_file", default=None)


def config_path() -> str | None:
    """The settings file in effect: `--config` (CONFIG_FILE), else EVOSTREAM_CONFIG."""
    return CONFIG_FILE.get() or os.environ.get(CONFIG_ENV) or None


#: Old setting names still accepted (issue #21: "checkpoint" meant both the model's weights and
#: a conversation's Redis state; the weights are now "model"). Using one records a deprecation.
DEPRECATED_NAMES = {"checkpoint": "model", "checkpoint_revision": "model_revision"}
_deprecations: list[str] = []


def _deprecated(line: str) -> None:
    if line not in _deprecations:
        _deprecations.append(line)


def take_deprecations() -> list[str]:
    """Deprecation lines recorded while settings were read (each once), for the caller to
    print; the list is emptied."""
    out = list(_deprecations)
    _deprecations.clear()
    return out


def _rename_deprecated(data: dict[str, Any], where: str) -> dict[str, Any]:
    for old, new in DEPRECATED_NAMES.items():
        if old in data:
            value = data.pop(old)
            data.setdefault(new, value)
            _deprecated(f"{where}: {old!r} is deprecated: use {new!r}")
    return data


class ConfigFileMissing(FileNotFoundError):
    """EVOSTREAM_CONFIG / --config names a file that does not exist. A typo in that path must
    not silently fall back to defaults (pydantic-settings' file sources skip missing files)."""


def _unwrap(data: Any) -> dict[str, Any]:
    if isinstance(data, dict) and isinstance(data.get(CONFIG_SECTION), dict):
        data = data[CONFIG_SECTION]
    return _rename_deprecated(dict(data or {}), f"settings file {config_path()}")


class _Json(JsonConfigSettingsSource):
    def _read_file(self, file_path: Any) -> dict[str, Any]:
        return _unwrap(super()._read_file(file_path))


class _Toml(TomlConfigSettingsSource):
    def _read_file(self, file_path: Any) -> dict[str, Any]:
        return _unwrap(super()._read_file(file_path))


class _Yaml(YamlConfigSettingsSource):
    def _read_file(self, file_path: Any) -> dict[str, Any]:
        return _unwrap(super()._read_file(file_path))


def config_file_source(settings_cls: type[BaseSettings]) -> PydanticBaseSettingsSource | None:
    """pydantic-settings' own file source for the settings file (`--config` or
    EVOSTREAM_CONFIG; chosen by suffix: .toml, .yaml/.yml, else JSON), or None when no file
    is configured."""
    path = config_path()
    if not path:
        return None
    p = Path(path)
    if not p.is_file():
        where = f"--config {path}" if CONFIG_FILE.get() else f"{CONFIG_ENV}={path}"
        raise ConfigFileMissing(f"{where}: no such file")
    if p.suffix == ".toml":
        return _Toml(settings_cls, toml_file=p)
    if p.suffix in (".yaml", ".yml"):
        return _Yaml(settings_cls, yaml_file=p)
    return _Json(settings_cls, json_file=p)


class _DeprecatedEnv(PydanticBaseSettingsSource):
    """EVOSTREAM_CHECKPOINT / EVOSTREAM_CHECKPOINT_REVISION, read as EVOSTREAM_MODEL /
    EVOSTREAM_MODEL_REVISION (below the new names in precedence), with a deprecation line."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover - unused
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for old, new in DEPRECATED_NAMES.items():
            var = f"EVOSTREAM_{old.upper()}"
            if var in os.environ:
                out[new] = os.environ[var]
                _deprecated(f"{var} is deprecated: use EVOSTREAM_{new.upper()}")
        return out


# --------------------------------------------------------------------------------------------- checks
ALL_TENANTS = "*"
MIN_API_KEY_CHARS = 16
REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel", "redis+cluster", "rediss+cluster")
#: Settings that name a file which must exist when the settings are read (a secret mounted by
#: the platform, a CA bundle). SQLite paths (index, cold tier) are created on use: not here.
FILE_SETTINGS = ("kafka_sasl_username_file", "kafka_sasl_password_file", "kafka_sasl_oauth_token_file",
                 "kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile", "kafka_ssl_key_password_file",
                 "redis_password_file", "redis_sentinel_password_file", "redis_tls_ca_file", "redis_tls_cert_file",
                 "redis_tls_key_file", "api_keys_file")


def parse_api_keys(raw: Any, source: str) -> dict[str, list[str | None]]:
    """An API-key table `{"<key>": tenants}`, tenants being a list of names, one name, `null`
    (the default tenant) or `"*"` (every tenant); keys of at least 16 characters. Messages
    never contain a key."""
    if not isinstance(raw, dict) or not all(isinstance(k, str) and k for k in raw):
        raise ValueError(f"{source}: expected a JSON object {{\"<key>\": [\"tenant\", ...]}}")
    out: dict[str, list[str | None]] = {}
    for i, (key, tenants) in enumerate(raw.items()):
        if tenants is None or isinstance(tenants, str):
            tenants = [tenants]
        if not isinstance(tenants, list) or not tenants or not all(
                t is None or (isinstance(t, str) and t) for t in tenants):
            raise ValueError(f"{source}: key #{i + 1} needs a tenant name, a list of them, null (the default "
                             f"tenant) or \"*\" (every tenant)")
        if len(key) < MIN_API_KEY_CHARS:
            raise ValueError(f"{source}: key #{i + 1} is too short: API keys must be at least "
                             f"{MIN_API_KEY_CHARS} characters")
        out[key] = list(tenants)
    return out


def read_api_keys_file(path: str) -> dict[str, list[str | None]]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not text.strip():
        raise ValueError(f"{path} is empty (expected a JSON object of API keys)")
    try:
        parsed = json.loads(text)
    except ValueError:
        raise ValueError(f"{path} is not valid JSON (expected {{\"<key>\": [\"tenant\", ...]}})") from None
    return parse_api_keys(parsed, path)


def _check_file(path: str) -> None:
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{path}: no such file")
    if not p.is_file():
        raise ValueError(f"{path} is not a file")
    if not os.access(p, os.R_OK):
        raise ValueError(f"{path} is not readable by this process")


def _check_hostports(value: str, what: str, example: str) -> None:
    for item in value.split(","):
        item = item.strip()
        host, sep, port = item.rpartition(":")
        if "://" in item or not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"expected {what} as host:port[,host:port...] without a scheme, e.g. {example}")


def _check_redis_url(url: str) -> None:
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in REDIS_SCHEMES:
        raise ValueError(f"unsupported scheme {scheme.lower() + '://' if sep else '(none)'}: use one of "
                         + ", ".join(f"{x}://" for x in REDIS_SCHEMES))
    if scheme.lower() == "unix":
        return
    hosts = rest.split("/", 1)[0].rpartition("@")[2]
    for item in hosts.split(","):
        port = item.rpartition("]")[2].rpartition(":")[2] if ":" in item.rpartition("]")[2] else ""
        if not item.strip() or (port and not port.isdigit()):
            raise ValueError("expected host[:port] after the scheme, e.g. redis://redis:6379/0")


class Settings(BaseSettings):
    # hide_input_in_errors: a ValidationError's text must not carry a secret (API keys, passwords)
    model_config = SettingsConfigDict(env_prefix="EVOSTREAM_", extra="forbid", hide_input_in_errors=True)

    # --- Kafka ---
    kafka_bootstrap: str = "127.0.0.1:9092"
    group_id: str = "evostream-workers"
    turns_topic: str = "evostream.turns"
    embeddings_topic: str = "evostream.embeddings"
    dead_letter_topic: str = "evostream.dead-letter"
    turns_partitions: int = Field(8, ge=1)
    session_timeout_s: float = Field(10.0, gt=0)
    rebalance_timeout_s: float = Field(10.0, gt=0)
    heartbeat_interval_s: float = Field(1.0, gt=0)
    commit_interval_s: float = Field(1.0, gt=0)
    producer_idempotence: bool = Field(
        False, description="turn on against a real Kafka cluster; the local tansu broker rejects InitProducerId")
    producer_linger_ms: int = 5
    fetch_max_wait_ms: int = Field(
        100, ge=1, le=60_000,
        description="longest a fetch waits for data; tansu answers only when it expires (faust hard-codes 1500)")
    max_record_bytes: int = Field(1_000_000, ge=1024)

    # --- Kafka security and topic administration (issue #8) ---
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL; used by every Kafka client")
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] = Field("PLAIN", description="PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 or OAUTHBEARER")
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_sasl_username_file: str | None = Field(None, description="read the SASL username from this file")
    kafka_sasl_password_file: str | None = Field(None, description="read the SASL password from this file")
    kafka_sasl_oauth_token_file: str | None = Field(
        None, description="OAUTHBEARER: file holding the bearer token, re-read on every authentication")
    kafka_ssl_cafile: str | None = Field(None, description="CA bundle (PEM) to verify the brokers; default: system CAs")
    kafka_ssl_certfile: str | None = Field(None, description="client certificate (PEM) for mutual TLS")
    kafka_ssl_keyfile: str | None = Field(None, description="client private key (PEM) for mutual TLS")
    kafka_ssl_key_password_file: str | None = None
    kafka_ssl_check_hostname: bool = Field(True, description="verify the broker's name against its certificate")
    topics_replication_factor: int = Field(1, ge=1, description="`evostream topics`: replicas of each topic")
    topics_retention_ms: int | None = Field(
        None, ge=-1, description="`evostream topics`: retention.ms of the turns/embeddings topics; None = broker default")
    dead_letter_retention_ms: int | None = Field(None, ge=-1, description="`evostream topics`: retention.ms of the dead-letter topic")
    kafka_max_message_bytes: int = Field(
        1_048_588, ge=16_384,
        description="largest record the broker accepts (Kafka's default message.max.bytes); "
                    "`evostream topics` sets it as max.message.bytes; dead letters are cut to fit it")
    worker_create_topics: bool = Field(
        False, description="workers create missing topics at start (development); default: only check, exit naming the missing")

    # --- Redis ---
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_namespace: str = "evostream"
    state_ttl_s: int | None = Field(7 * 24 * 3600, description="idle conversations expire; None = never")
    compact_every: int = Field(32, ge=1)

    # --- Redis topologies and TLS (issue #8); the URL scheme picks the topology ---
    redis_password_file: str | None = Field(None, description="read the Redis password from this file (wins over the URL's)")
    redis_sentinel_password_file: str | None = Field(None, description="password of the Sentinels themselves")
    redis_tls_ca_file: str | None = Field(None, description="rediss*: CA bundle (PEM) of the server certificates")
    redis_tls_cert_file: str | None = Field(None, description="rediss*: client certificate (PEM)")
    redis_tls_key_file: str | None = Field(None, description="rediss*: client key (PEM)")
    redis_tls_check_hostname: bool = True

    # --- checkpoint integrity and durability (issue #7) ---
    marker_ttl_s: int | None = Field(
        30 * 24 * 3600, gt=0,
        description="a conversation's small marker (generation, last seq) outlives its state by this, and a "
                    "delete's tombstone lives this long: expiry is told apart from a gap, deletes stay final")
    redis_durability: Durability = Field(
        Durability.REPLY, description="before offsets are acknowledged: reply | aof (WAITAOF) | replicas (WAIT) | aof+replicas")
    redis_durability_replicas: int = Field(1, ge=0, description="replicas that must have a commit (replicas, aof+replicas)")
    redis_durability_timeout_ms: int = Field(2000, ge=1, description="longest wait for fsync/replicas; the batch is retried after it")
    redis_allow_eviction: bool = Field(
        False, description="start even if Redis' maxmemory-policy is not noeviction (evicted keys quarantine conversations)")
    # --- a store that is lost, full or of another precision (issue #17) ---
    store_check_interval_s: float = Field(
        1.0, gt=0, description="how often a worker re-reads the store's identity and watermarks (an emptied or "
                               "rolled-back Redis is noticed within this even when no turn arrives)")
    store_retry_backoff_max_s: float = Field(
        5.0, gt=0, description="ceiling of the back-off between retries against a Redis that answers but refuses "
                               "writes (full at maxmemory): bounds the retry rate")
    store_dtype_join: Literal["refuse", "adopt"] = Field(
        "refuse", description="a worker whose state storage dtype differs from the store's: refuse to start (exit "
                              "78), or adopt the store's dtype for what it reads and writes")
    gap_max_dead_letters: int = Field(
        8, ge=0, description="GAP_POLICY=dead_letter: after this many gapped turns of a conversation, it continues without the missing ones")

    # --- capacity levers (issue #14) ---
    state_storage_dtype: Literal["same", "bfloat16"] = Field(
        "same", description="dtype of the latents kept in Redis; bfloat16 halves a float32 state "
                            "(each turn's latents are rounded to it; drift measured in docs/CAPACITY.md)")
    state_ttl_by_tenant: dict[str, int | None] = Field(
        default_factory=dict, description='tenant -> idle TTL in seconds (null = never), JSON; "" = the default tenant; '
                                          "others use state_ttl_s")
    cold_tier_path: str | None = Field(
        None, description="directory of the cold tier's SQLite shards (an existing single file is read as one shard): "
                          "conversations frozen by `evostream cold-tier freeze` are brought back on their next turn")
    cold_tier_shards: int = Field(
        16, ge=1, le=4096, description="SQLite files of a new cold tier (conversations spread by hash); an existing "
                                       "tier keeps the count its manifest records")

    # --- model (issue #21: "model" names the weights; EVOSTREAM_CHECKPOINT* are deprecated aliases) ---
    model: str = Field("", description="model directory (released EvoRAG layout) or hub id (owner/name); "
                                       "empty = the seeded tiny one")
    backbone_config: str | None = Field(
        None, description="base model config.json path or hub id, when neither the model directory nor the hub cache has it")
    model_revision: str | None = Field(
        None, description="hub revision (branch, tag or commit) when the model is a hub id; default: main")
    # --- the vector sink and its index (issue #19) ---
    index_path: str | None = Field(
        None, description="`evostream sink`/`search` without a sink_dsn: SQLite file of the index; "
                          "default: one per broker and topic under the cache dir")
    sink_dsn: SecretStr | None = Field(
        None, description="PostgreSQL (with pgvector) the sink writes and searches read: a libpq URI or "
                          "key=value string, TLS through its own parameters (sslmode=verify-full, sslrootcert=...); "
                          "unset: the SQLite index at index_path")
    sink_search_dsn: SecretStr | None = Field(
        None, description="searches connect with this instead of sink_dsn (a read-only role; with sink_rls, "
                          "one that row-level security applies to)")
    sink_schema: str = Field("public", pattern=r"^[a-z_][a-z0-9_]{0,62}$",
                             description="PostgreSQL schema of the sink's tables")
    sink_table_prefix: str = Field("evostream", pattern=r"^[a-z_][a-z0-9_]{0,40}$",
                                   description="tables <prefix>_turns, _texts, _offsets, _rejects")
    sink_name: str = Field("evostream-sink", min_length=1, max_length=200,
                           description="the sink's identity: its stored offsets and its writer lock (one active sink per name)")
    sink_batch_max: int = Field(500, ge=1, le=100_000, description="records per database transaction")
    sink_texts: bool = Field(True, description="also read the turns topic: each turn's text is stored beside its vector")
    sink_rls: bool = Field(False, description="enable PostgreSQL row-level security on the sink's tables: a search "
                                              "role sees only the tenant its transaction names")
    sink_hnsw_ef_search: int = Field(100, ge=1, le=1000, description="hnsw.ef_search of tenant-wide searches "
                                                                     "(recall vs latency, BENCHMARKS.md)")
    sink_metrics_port: int | None = Field(None, ge=0, le=65535,
                                          description="`evostream sink` serves Prometheus /metrics here (lag, rows/s); unset: off")
    # --- Kafka Connect conventions of the embeddings topic (issue #19) ---
    output_document_id_header: bool = Field(
        True, description="each embedding record carries its per-turn document id as header evostream.document_id "
                          "(it is always a field of the event)")
    output_vector_format: Literal["encoded", "floats"] = Field(
        "encoded", description="vector field of embedding events: encoded (base64 float32) or floats (a plain JSON "
                               "array, for sinks that map it to an array column)")
    output_tombstones: Literal["event", "null", "both"] = Field(
        "event", description="a deleted conversation as a conversation_deleted event, a null-value record "
                             "(Kafka tombstone, key = conversation id), or the event followed by the null record")
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        "float32", description="compute dtype; auto = bfloat16 on CUDA, on CPU what a start-up probe measures faster, "
                               "with float32 memory (issue #22)")
    memory_rendering: str = "chatml"

    # --- batching ---
    batch_max_turns: int = Field(64, ge=1)
    batch_max_wait_ms: int = Field(50, ge=0)
    max_batch_tokens: int = Field(32768, ge=256)
    max_batch_rows: int = Field(64, ge=1)
    max_turn_tokens: int = Field(8192, ge=16, description="longer turns are dead-lettered (turn_too_long)")
    max_json_depth: int = Field(32, ge=4, le=128)
    gap_policy: GapPolicy = GapPolicy.APPLY

    # --- state cache ---
    cache_max_bytes: int = Field(256 * 1024 * 1024, ge=0)

    # --- segment-prefix cache of the model step (issue #10), on by default (issue #22) ---
    prefix_cache_max_bytes: int | Literal["auto"] = Field(
        "auto", description="bytes of open-segment memory prefixes kept for the next turn (LRU); 0 = off; "
                            "auto = 1/8 of the worker's memory (cgroup limit, RAM or GPU), 64 MiB to 4 GiB")
    # --- query-ready memory (issue #22) ---
    query_cache_max_bytes: int | Literal["auto"] = Field(
        "auto", description="bytes of query-ready memories (the retriever's work over each conversation's "
                            "queue, LRU) so queries and the next turn compute only their own tokens; 0 = off; "
                            "auto as for prefix_cache_max_bytes")

    # --- web / ops ---
    web_host: str = "127.0.0.1"
    web_port: int = 6066
    worker_id: str = Field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    log_level: str = "INFO"
    log_json: bool = True

    # --- query API (issue #9) ---
    api_auth: Literal["required", "off"] = Field(
        "required", description="'off' serves every tenant without a key: only for local use (demo, tests)")
    api_keys: SecretStr | None = Field(
        None, description='JSON {"<key>": [tenants]}: the tenants each API key may read; null = the default tenant, '
                          '"*" = all (a secret: never printed)')
    api_keys_file: str | None = Field(None, description="JSON file with more keys, same shape as api_keys")
    api_max_body_bytes: int = Field(1_048_576, ge=1024, description="larger request bodies get 413")
    api_max_inputs: int = Field(64, ge=1, description="inputs (texts, candidates) per request; more gets 413")
    api_max_input_tokens: int = Field(2048, ge=16, description="tokens per input text; longer gets 413")
    query_queue_max: int = Field(256, ge=1, description="query requests waiting for the model; more gets 429")
    query_batch_max: int = Field(32, ge=1, description="texts per query forward pass (micro-batch)")
    query_batch_wait_ms: float = Field(2.0, ge=0, description="how long a query pass waits to fill up")
    query_share: float = Field(
        0.2, gt=0, le=1, description="largest share of the model thread queries get while ingestion is busy")
    query_idle_grace_ms: float = Field(
        250.0, ge=0, description="ingestion counts as busy until it has been idle this long")

    # --- interop with other producers (issue #13) ---
    output_compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = Field(
        "zstd", description="batch compression of the embeddings and dead-letter topics; zstd measured "
                            "30% smaller per embedding event for little producer CPU (BENCHMARKS.md)")
    input_strict: bool = Field(
        False, description="dead-letter turns with unknown fields/roles (the pre-1.1 contract); "
                           "default: accept, keep them in metadata, count them")

    # --- broker faults and shutdown (issue #12) ---
    broker_probe_interval_s: float = Field(
        2.0, gt=0, description="how often the worker asks the broker for metadata + its group coordinator")
    broker_probe_timeout_s: float = Field(5.0, gt=0, description="a probe without an answer by then failed")
    broker_unreachable_after_s: float = Field(
        6.0, gt=0, description="no probe answered for this long: broker unreachable (readiness false)")
    broker_retry_backoff_max_s: float = Field(
        10.0, gt=0, description="cap of the exponential back-off of reconnects while the broker is unreachable")
    shutdown_grace_s: float = Field(
        20.0, gt=0, le=3600, description="after SIGTERM the process is gone within this; exit 75 if it had to cut short")
    log_repeat_window_s: float = Field(
        60.0, gt=0, description="Kafka client libraries log each kind of line at most log_repeat_burst times per window")
    log_repeat_burst: int = Field(3, ge=1)

    @field_validator("prefix_cache_max_bytes", "query_cache_max_bytes")
    @classmethod
    def _cache_budget(cls, v: int | str) -> int | str:
        if v != "auto" and int(v) < 0:
            raise ValueError("a cache budget is >= 0 bytes or 'auto'")
        return v

    @field_validator("memory_rendering")
    @classmethod
    def _rendering(cls, v: str) -> str:
        if v not in ("chatml", "client"):
            raise ValueError("memory_rendering must be 'chatml' or 'client'")
        return v

    @field_validator("kafka_bootstrap")
    @classmethod
    def _bootstrap(cls, v: str) -> str:
        _check_hostports(v, "the Kafka bootstrap servers", "kafka-0:9092,kafka-1:9092")
        return v

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, v: str) -> str:
        _check_redis_url(v)
        return v

    @field_validator(*FILE_SETTINGS)
    @classmethod
    def _existing_file(cls, v: str | None) -> str | None:
        if v:
            _check_file(v)
        return v

    @field_validator("api_keys")
    @classmethod
    def _api_keys(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None:
            try:
                parsed = json.loads(v.get_secret_value())
            except ValueError:
                raise ValueError('not valid JSON (expected {"<key>": ["tenant", ...]}; the value is not shown)') from None
            parse_api_keys(parsed, "the table")
        return v

    @field_validator("api_keys_file")
    @classmethod
    def _api_keys_file(cls, v: str | None) -> str | None:
        if v:
            read_api_keys_file(v)
        return v

    def api_key_table(self) -> dict[str, list[str | None]]:
        """Every configured API key -> its tenants (`api_keys`, then `api_keys_file`)."""
        table: dict[str, list[str | None]] = {}
        if self.api_keys is not None:
            table.update(parse_api_keys(json.loads(self.api_keys.get_secret_value()), "EVOSTREAM_API_KEYS"))
        if self.api_keys_file:
            table.update(read_api_keys_file(self.api_keys_file))
        return table

    def serving_problem(self) -> str | None:
        """Why a worker with these settings could not serve its query API as configured, or
        None. Authentication on with no key means every query gets 401: a worker refuses to
        start on it (issue #18: it used to start silently). Only `serve` commands ask."""
        if self.api_auth == "required" and not self.api_key_table():
            return ("no API keys configured while EVOSTREAM_API_AUTH=required: every query would get 401; set "
                    "EVOSTREAM_API_KEYS or EVOSTREAM_API_KEYS_FILE, or EVOSTREAM_API_AUTH=off for local use")
        return None

    @model_validator(mode="after")
    def _cluster_durability(self) -> "Settings":
        # issue #8: WAIT/WAITAOF after a cluster pipeline would reach one random node, not the
        # masters that took the writes; refuse the combination at start, not at the first commit.
        if self.redis_url.split("://", 1)[0].lower().endswith("+cluster") and \
                str(getattr(self.redis_durability, "value", self.redis_durability)) != "reply":
            raise ValueError("redis_durability must be 'reply' with a Redis Cluster URL (redis+cluster://)")
        return self

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource) -> tuple[PydanticBaseSettingsSource, ...]:
        # Precedence: explicit arguments (CLI flags) > EVOSTREAM_* environment > deprecated
        # EVOSTREAM_* names > settings file.
        file_source = config_file_source(settings_cls)
        sources = (init_settings, env_settings, _DeprecatedEnv(settings_cls)) + (
            (file_source,) if file_source is not None else ())
        return sources + (file_secret_settings,)
