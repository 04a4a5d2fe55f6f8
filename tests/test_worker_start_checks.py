"""What a worker checks about Redis before it serves (issues #7 and #8), with real worker
processes against the session's real Redis.

* an eviction policy other than `noeviction` may drop one key of a conversation: the worker
  refuses to start (one line, exit 78) unless told to accept it;
* credentials Redis refuses are a configuration error, not an outage to wait out for ever;
* until Redis has been checked, `/readyz` is 503 (an orchestrator must not route to it).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis

from tests.support.traffic import TopicMaker, pipeline_env
from tests.support.workers import WorkerProc, free_port

EX_CONFIG = 78


@pytest.fixture
def penv_factory(kafka_bootstrap: str, redis_url: str):
    topics = TopicMaker(kafka_bootstrap, "start-checks")
    try:
        yield lambda **extra: pipeline_env(topics, kafka_bootstrap, redis_url, partitions=1, extra=extra)
    finally:
        topics.close()


def _exit_code(w: WorkerProc, timeout: float = 90.0) -> int:
    deadline = time.monotonic() + timeout
    while w.alive():
        if time.monotonic() > deadline:
            w.kill()
            raise AssertionError(f"worker still running after {timeout}s:\n{w.tail()}")
        time.sleep(0.5)
    return w.proc.returncode


def test_worker_refuses_a_redis_that_may_evict(penv_factory, redis_url: str, tmp_path: Path) -> None:
    r = redis.Redis.from_url(redis_url)
    r.config_set("maxmemory-policy", "volatile-lru")
    try:
        w = WorkerProc(penv_factory(), tmp_path, "evict").start()
        assert _exit_code(w) == EX_CONFIG, w.tail()
        log = w.tail(400)
        assert "refusing to start" in log and "volatile-lru" in log and "noeviction" in log
        assert "Traceback" not in log
        ok = WorkerProc(penv_factory(EVOSTREAM_REDIS_ALLOW_EVICTION="true"), tmp_path, "evict-ok").start()
        try:
            ok.wait_ready()
        finally:
            ok.stop()
    finally:
        r.config_set("maxmemory-policy", "noeviction")
        r.close()


def test_worker_with_refused_redis_credentials_exits_with_one_line(penv_factory, redis_url: str,
                                                                   tmp_path: Path) -> None:
    r = redis.Redis.from_url(redis_url)
    r.acl_setuser("evo-start-check", enabled=True, passwords=["+right-password"], keys=["*"], commands=["+@all"])
    try:
        host_port = redis_url.split("//", 1)[1]
        penv = penv_factory()
        penv.redis_url = f"redis://evo-start-check:wrong-password@{host_port}"
        w = WorkerProc(penv, tmp_path, "auth").start()
        assert _exit_code(w) == EX_CONFIG, w.tail()
        log = w.tail(400)
        assert "refused the configured credentials" in log and "Traceback" not in log
        assert "wrong-password" not in log  # the password is never printed
    finally:
        r.acl_deluser("evo-start-check")
        r.close()


def test_not_ready_while_redis_cannot_be_reached_at_start(penv_factory, tmp_path: Path) -> None:
    penv = penv_factory()
    penv.redis_url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    w = WorkerProc(penv, tmp_path, "noredis").start()
    try:
        deadline = time.monotonic() + 90
        seen = None
        while time.monotonic() < deadline:
            try:
                seen = w.status()
            except OSError:
                time.sleep(0.5)
                continue
            if seen[1].get("assigned"):
                break  # assigned its partition, still waiting for Redis
            time.sleep(0.5)
        assert seen is not None, w.tail()
        code, body = w.status()
        assert code == 503 and body["store"] == "starting" and body["ready"] is False, body
        assert w.alive()
    finally:
        w.kill()
