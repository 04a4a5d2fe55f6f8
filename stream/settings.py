"""All worker settings in one validated object: environment (EVOSTREAM_*), then an optional
config file (JSON/TOML/YAML, named by EVOSTREAM_CONFIG or --config), then defaults.

The defaults are the embedded local setup (tansu broker + local Redis + tiny checkpoint);
production overrides broker, Redis, checkpoint, device and the idempotent producer.
"""

from __future__ import annotations

import json
import os
import socket
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict


class GapPolicy(str, Enum):
    APPLY = "apply"              # apply the turn, log a warning, count it
    DEAD_LETTER = "dead_letter"  # refuse the turn (and, necessarily, every later one until fixed)


def _file_settings() -> dict[str, Any]:
    path = os.environ.get("EVOSTREAM_CONFIG")
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"EVOSTREAM_CONFIG={path} does not exist")
    text = p.read_text()
    if p.suffix in (".toml",):
        import tomllib

        data = tomllib.loads(text)
    elif p.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    return dict(data.get("evostream", data))


class _FileSource(PydanticBaseSettingsSource):
    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return _file_settings()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EVOSTREAM_", extra="forbid")

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

    # --- Redis ---
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_namespace: str = "evostream"
    state_ttl_s: int | None = Field(7 * 24 * 3600, description="idle conversations expire; None = never")
    compact_every: int = Field(32, ge=1)

    # --- model ---
    checkpoint: str = Field("", description="checkpoint directory; empty = generate/use the tiny one")
    backbone_config: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
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

    # --- web / ops ---
    web_host: str = "127.0.0.1"
    web_port: int = 6066
    worker_id: str = Field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    log_level: str = "INFO"
    log_json: bool = True

    @field_validator("memory_rendering")
    @classmethod
    def _rendering(cls, v: str) -> str:
        if v not in ("chatml", "client"):
            raise ValueError("memory_rendering must be 'chatml' or 'client'")
        return v

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _FileSource(settings_cls), file_secret_settings)
