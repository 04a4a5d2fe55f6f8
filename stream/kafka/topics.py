"""Kafka topic names and idempotent topic administration.

Why this module exists: every process that touches Kafka (workers, the CLI, the local
stack, tests, the docker-compose one-shot service) must agree on topic names and
partition counts, and must be able to "make sure the topics exist" at start-up without
racing each other. Creating a topic that already exists is therefore *not* an error here.

Partition counts matter for correctness, not only for throughput: a conversation's turns
are keyed by ``conversation_id`` and the key -> partition mapping (murmur2 % partitions)
only stays stable while the partition count does. So an existing topic whose partition
count differs from the requested one is reported (logged and returned), never silently
"fixed".

Broker quirks this code guards against (tansu 0.6, the offline test broker):

* A Metadata request for an unknown topic auto-creates it (with the broker's default
  partition count). ``describe_topics`` sends such a request, so we always *create first*
  and describe afterwards; describing first would create the topic with the wrong count.
* CreateTopics does not validate ``num_partitions`` (0 is accepted), so we validate.
* aiokafka's ``create_topics`` does not raise per-topic errors; it returns them in the
  response, so we read the error codes ourselves.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, TypeVar

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, for_code

if TYPE_CHECKING:
    from stream.kafka.security import KafkaSecurity

log = logging.getLogger(__name__)

TURNS_TOPIC = "evostream.turns"
EMBEDDINGS_TOPIC = "evostream.embeddings"
DEAD_LETTER_TOPIC = "evostream.dead-letter"

#: Default topic -> partition count. The turns and embeddings topics share a count so a
#: conversation's input and output land on the same partition number (handy for tracing).
DEFAULT_TOPICS: dict[str, int] = {
    TURNS_TOPIC: 8,
    EMBEDDINGS_TOPIC: 8,
    DEAD_LETTER_TOPIC: 1,
}

_TOPIC_ALREADY_EXISTS = 36
_UNKNOWN_TOPIC_OR_PARTITION = 3

T = TypeVar("T")


class TopicError(RuntimeError):
    """A topic could not be created or described (other than "already exists")."""


def run_sync(factory: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to completion from synchronous code.

    Why a factory and a thread: test fixtures and CLIs are synchronous, but may be called
    while an event loop already runs in this thread (``asyncio.run`` would refuse). In that
    case the coroutine runs on a private loop in a helper thread. The factory is called on
    the loop that runs it, so aiokafka clients bind to the right loop.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_call(factory))
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="run-sync") as pool:
        return pool.submit(asyncio.run, _call(factory)).result()


async def _call(factory: Callable[[], Awaitable[T]]) -> T:
    return await factory()


def _security_kwargs(security: KafkaSecurity | None) -> dict:
    return security.client_kwargs() if security is not None else {}


async def _admin(bootstrap: str, request_timeout_ms: int, security: KafkaSecurity | None = None) -> AIOKafkaAdminClient:
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap,
        request_timeout_ms=request_timeout_ms,
        client_id="evostream-admin",
        **_security_kwargs(security),
    )
    await admin.start()
    return admin


async def wait_for_broker(bootstrap: str, timeout: float = 20.0, *, security: KafkaSecurity | None = None) -> None:
    """Block until the broker answers a metadata request, or raise ``TimeoutError``.

    Why: a freshly started broker (or a container that is "up" but still electing its
    controller) refuses connections for a while; callers want one clear failure after a
    bounded wait, not a stack of connection-refused warnings.
    """
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        admin: AIOKafkaAdminClient | None = None
        try:
            # A plain TCP probe first: aiokafka logs an error per refused connection, which
            # would bury the one useful message under dozens of identical lines.
            await _tcp_probe(bootstrap, security)
            admin = await _admin(bootstrap, request_timeout_ms=2000, security=security)
            await admin.describe_cluster()
            return
        except ssl.SSLError as exc:
            if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
                last = exc  # the peer hung up mid-handshake (e.g. still starting): retry
            else:
                # An untrusted certificate or a refused handshake does not cure itself: fail now.
                from stream.kafka.security import describe_connect_error

                assert security is not None  # TLS errors only arise with a TLS context
                raise ConnectionError(await describe_connect_error(bootstrap, security, exc)) from None
        except (KafkaError, OSError, asyncio.TimeoutError) as exc:
            last = exc
        finally:
            if admin is not None:
                try:
                    await admin.close()
                except Exception:  # noqa: BLE001 - closing a half-open client is best effort
                    pass
        if time.monotonic() >= deadline:
            if security is not None and last is not None:
                from stream.kafka.security import describe_connect_error

                raise TimeoutError(f"not ready after {timeout:.1f}s: "
                                   f"{await describe_connect_error(bootstrap, security, last)}")
            raise TimeoutError(f"Kafka broker at {bootstrap} not ready after {timeout:.1f}s: {last!r}")
        await asyncio.sleep(0.1)


async def _tcp_probe(bootstrap: str, security: KafkaSecurity | None = None) -> None:
    """Connect (and, for TLS, handshake) with the first bootstrap server."""
    host, _, port = bootstrap.split(",")[0].strip().rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    ctx = security.ssl_context() if security is not None else None
    _, writer = await asyncio.wait_for(
        asyncio.open_connection(host, int(port), ssl=ctx, server_hostname=host if ctx else None), 2.0)
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass


async def ensure_topics(
    bootstrap: str,
    topics: Mapping[str, int],
    replication: int = 1,
    *,
    request_timeout_ms: int = 10_000,
    security: KafkaSecurity | None = None,
    configs: Mapping[str, Mapping[str, str]] | None = None,
) -> dict[str, int]:
    """Create the given topics if missing; return each topic's actual partition count.

    Existing topics are fine (idempotent, safe for concurrent callers). An existing topic
    with a different partition count is logged as a warning and its real count returned,
    so callers that depend on the count can decide to fail. `configs` ({topic: {key: value}},
    e.g. max.message.bytes, retention.ms) apply to topics this call creates; existing topics
    keep their configuration (changing it is an operator's decision, not a side effect).
    """
    for name, partitions in topics.items():
        if not name or partitions < 1:
            raise ValueError(f"invalid topic spec {name!r}: {partitions} partitions")
    if not topics:
        return {}
    admin = await _admin(bootstrap, request_timeout_ms, security)
    configs = configs or {}
    try:
        response = await admin.create_topics(
            [NewTopic(name, partitions, replication, topic_configs=dict(configs.get(name, {})))
             for name, partitions in topics.items()]
        )
        for entry in response.topic_errors:
            name, code = entry[0], entry[1]
            if code not in (0, _TOPIC_ALREADY_EXISTS):
                message = entry[2] if len(entry) > 2 else None
                raise TopicError(f"creating topic {name!r} failed: {for_code(code).__name__} {message or ''}")
        actual = await _partition_counts(admin, list(topics))
    finally:
        await admin.close()
    for name, wanted in topics.items():
        if actual[name] != wanted:
            log.warning("topic %s exists with %d partitions (wanted %d)", name, actual[name], wanted)
    return actual


async def _partition_counts(admin: AIOKafkaAdminClient, names: list[str]) -> dict[str, int]:
    described = await admin.describe_topics(names)
    counts: dict[str, int] = {}
    for topic in described:
        if topic["error_code"] != 0:
            raise TopicError(f"describing topic {topic['topic']!r} failed: {for_code(topic['error_code']).__name__}")
        counts[topic["topic"]] = len(topic["partitions"])
    return counts


async def delete_topics(bootstrap: str, names: Iterable[str], *, request_timeout_ms: int = 10_000,
                        security: KafkaSecurity | None = None) -> None:
    """Delete topics; missing ones are ignored (cleanup must be idempotent too)."""
    names = list(names)
    if not names:
        return
    admin = await _admin(bootstrap, request_timeout_ms, security)
    try:
        response = await admin.delete_topics(names)
        for name, code in response.topic_error_codes:
            if code not in (0, _UNKNOWN_TOPIC_OR_PARTITION):
                raise TopicError(f"deleting topic {name!r} failed: {for_code(code).__name__}")
    finally:
        await admin.close()


def ensure_topics_sync(bootstrap: str, topics: Mapping[str, int], replication: int = 1, *,
                       security: KafkaSecurity | None = None,
                       configs: Mapping[str, Mapping[str, str]] | None = None) -> dict[str, int]:
    """Synchronous :func:`ensure_topics` for fixtures and CLIs."""
    return run_sync(lambda: ensure_topics(bootstrap, topics, replication, security=security, configs=configs))


def delete_topics_sync(bootstrap: str, names: Iterable[str], *, security: KafkaSecurity | None = None) -> None:
    """Synchronous :func:`delete_topics`."""
    names = list(names)
    run_sync(lambda: delete_topics(bootstrap, names, security=security))


def wait_for_broker_sync(bootstrap: str, timeout: float = 20.0, *, security: KafkaSecurity | None = None) -> None:
    """Synchronous :func:`wait_for_broker`."""
    run_sync(lambda: wait_for_broker(bootstrap, timeout, security=security))


class TopicsMissing(TopicError):
    """Topics a worker needs do not exist (workers do not create topics by default)."""

    def __init__(self, missing: list[str], bootstrap: str) -> None:
        super().__init__(
            f"topic(s) {', '.join(missing)} missing on the broker at {bootstrap}; create them with "
            "`evostream topics` (an admin step: it needs the CreateTopics permission), or set "
            "EVOSTREAM_WORKER_CREATE_TOPICS=true for a development broker")
        self.missing = missing


async def missing_topics(bootstrap: str, names: Iterable[str], *, security: KafkaSecurity | None = None,
                         request_timeout_ms: int = 10_000) -> list[str]:
    """The names in `names` that do not exist. Uses an all-topics metadata request, which never
    auto-creates (asking for topics by name would, on tansu or Kafka with auto-create on)."""
    admin = await _admin(bootstrap, request_timeout_ms, security)
    try:
        existing = set(await admin.list_topics())
    finally:
        await admin.close()
    return [n for n in names if n not in existing]


def settings_topics(s: object) -> tuple[dict[str, int], dict[str, dict[str, str]]]:
    """({topic: partitions}, {topic: configs}) that `evostream topics` creates for Settings `s`.

    The turns and embeddings topics share a partition count (a conversation keeps one partition
    number end to end); max.message.bytes is the broker limit the worker bounds its records
    (dead letters included) by, so the topic never refuses what the worker sends."""
    counts = {s.turns_topic: s.turns_partitions, s.embeddings_topic: s.turns_partitions,  # type: ignore[attr-defined]
              s.dead_letter_topic: 1}  # type: ignore[attr-defined]
    base = {"max.message.bytes": str(s.kafka_max_message_bytes)}  # type: ignore[attr-defined]
    configs: dict[str, dict[str, str]] = {}
    for name in counts:
        cfg = dict(base)
        retention = (s.dead_letter_retention_ms if name == s.dead_letter_topic  # type: ignore[attr-defined]
                     else s.topics_retention_ms)  # type: ignore[attr-defined]
        if retention is not None:
            cfg["retention.ms"] = str(retention)
        configs[name] = cfg
    return counts, configs
