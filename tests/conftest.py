"""Session-wide real services for the test suite.

Why: tests talk to a real Kafka-protocol broker and a real Redis over loopback sockets
(see devtools/localstack.py); one stack per session keeps start-up cost to a fraction of a
second. It starts lazily, so tests that need neither never pay for it.

Point the suite at external services instead with ``EVOSTREAM_TEST_KAFKA_BOOTSTRAP`` and/or
``EVOSTREAM_TEST_REDIS_URL``; whatever is not given externally is still started locally.
Tests that must control the processes (stop/kill Redis, pause the broker) request
``local_stack`` and are skipped when either service is external.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Iterator

import pytest
import redis

from devtools.localstack import ENV_KAFKA, ENV_REDIS, LocalStack
from stream.kafka.topics import delete_topics_sync, ensure_topics_sync
from tests.support.peers import SKIP_PREFIX, require_peer
from tests.support.pg import pg_dsn, pg_target  # noqa: F401 - the bundled PostgreSQL (issue #19)

EXTERNAL_KAFKA = "EVOSTREAM_TEST_KAFKA_BOOTSTRAP"
EXTERNAL_REDIS = "EVOSTREAM_TEST_REDIS_URL"

# One chaos run id per pytest session (tests/support/chaos.py), set before any pytest-xdist
# worker starts: workers inherit it, so the report sees their scenarios as one run.
os.environ.setdefault("EVOSTREAM_CHAOS_RUN_ID", f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.getpid()}")
if "EVOSTREAM_CHAOS_COMMAND" not in os.environ:  # the command as typed (xdist workers see other argv)
    _scale = os.environ.get("EVOSTREAM_CHAOS_SCALE")
    os.environ["EVOSTREAM_CHAOS_COMMAND"] = ((f"EVOSTREAM_CHAOS_SCALE={_scale} " if _scale else "")
                                             + "python -m pytest " + shlex.join(sys.argv[1:])).strip()

# No model hub is ever contacted by the suite (issue #11): a checkpoint or backbone named by
# hub id resolves from the hub cache only; inherited by every worker subprocess.
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def _managed_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack | None]:
    """The locally started services (None if both are external)."""
    external_kafka = bool(os.environ.get(EXTERNAL_KAFKA))
    external_redis = bool(os.environ.get(EXTERNAL_REDIS))
    if external_kafka and external_redis:
        yield None
        return
    stack = LocalStack(
        tmp_path_factory.mktemp("localstack"),
        with_broker=not external_kafka,
        with_redis=not external_redis,
        # A session killed hard (SIGKILL, OOM) takes its servers with it.
        die_with_parent=True,
    )
    stack.start()
    try:
        yield stack
    finally:
        stack.stop(grace=3.0)


@pytest.fixture(scope="session")
def local_stack(_managed_stack: LocalStack | None) -> LocalStack:
    """The session's LocalStack, for tests that stop/kill/pause its processes.

    Tests using it must leave both services running when they finish.
    """
    if _managed_stack is None or _managed_stack.broker is None or _managed_stack.redis is None:
        pytest.skip(f"needs locally managed services ({EXTERNAL_KAFKA}/{EXTERNAL_REDIS} is set)")
    return _managed_stack


@pytest.fixture(scope="session")
def kafka_bootstrap(request: pytest.FixtureRequest) -> str:
    """``host:port`` of the session's Kafka-protocol broker."""
    external = os.environ.get(EXTERNAL_KAFKA)
    if external:
        return external
    return request.getfixturevalue("_managed_stack").kafka_bootstrap


@pytest.fixture(scope="session")
def redis_url(request: pytest.FixtureRequest) -> str:
    """``redis://host:port/db`` of the session's Redis."""
    external = os.environ.get(EXTERNAL_REDIS)
    if external:
        return external
    return request.getfixturevalue("_managed_stack").redis_url


@pytest.fixture(scope="session")
def stack_env(kafka_bootstrap: str, redis_url: str) -> dict[str, str]:
    """``os.environ`` plus EVOSTREAM_KAFKA_BOOTSTRAP / EVOSTREAM_REDIS_URL, for subprocesses."""
    return {**os.environ, ENV_KAFKA: kafka_bootstrap, ENV_REDIS: redis_url}


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A redis-py client on an empty database (FLUSHDB before the test)."""
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    try:
        yield client
    finally:
        client.close()


TopicFactory = Callable[..., str]


@pytest.fixture
def topic_factory(kafka_bootstrap: str, request: pytest.FixtureRequest) -> Iterator[TopicFactory]:
    """``make(partitions=1, *, name=None) -> str``: create a uniquely named topic.

    Names are ``test.<test name>.<random>`` so tests never see each other's data even
    on a shared (external) broker. Topics are deleted after the test, best effort.
    """
    created: list[str] = []
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", request.node.name)[:100]

    def make(partitions: int = 1, *, name: str | None = None) -> str:
        topic = name or f"test.{base}.{uuid.uuid4().hex[:8]}"
        counts = ensure_topics_sync(kafka_bootstrap, {topic: partitions})
        if counts[topic] != partitions:
            raise AssertionError(f"topic {topic} has {counts[topic]} partitions, wanted {partitions}")
        created.append(topic)
        return topic

    yield make
    try:
        delete_topics_sync(kafka_bootstrap, created)
    except Exception as exc:  # noqa: BLE001 - cleanup must not turn a pass into an error
        warnings.warn(f"could not delete test topics {created}: {exc!r}", stacklevel=1)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread for a module of in-process model tests: on a small shared machine,
    OpenMP threads spinning against other processes made tiny-model passes 10-20x slower.
    Restored afterwards. Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


# --------------------------------------------------------------------------- system peers (issue #20)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """`@pytest.mark.peer(package, *commands)`: skip (developer without root) or fail (CI, root)
    when the Debian peer is not installed (tests/support/peers.py)."""
    for mark in item.iter_markers("peer"):
        require_peer(*mark.args)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """Name the peers whose absence skipped tests, on one line at the end of the summary."""
    counts: dict[str, int] = {}
    for rep in terminalreporter.stats.get("skipped", []):
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr or "")
        if SKIP_PREFIX in reason:
            name = reason.split(SKIP_PREFIX, 1)[1].split()[0]
            counts[name] = counts.get(name, 0) + 1
    if counts:
        listed = ", ".join(f"{n} ({c} test{'s' if c > 1 else ''})" for n, c in sorted(counts.items()))
        terminalreporter.write_line(f"SKIPPED FOR MISSING SYSTEM PEERS: {listed}; run scripts/system-deps.sh as root",
                                    yellow=True, bold=True)
