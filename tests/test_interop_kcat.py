"""A non-Python Kafka client end to end: kcat (librdkafka) produces turns with zstd and
consumes the embeddings; they equal the offline result (issue #13).

kcat 1.7.1 (librdkafka 2.0.2, Debian) cannot read the local tansu broker's ApiVersions v3
answer; the broker here therefore advertises a loopback pass-through that answers that one
request the way Kafka specifies for an unsupported version (tests/support/kafka_compat_proxy.py)
and forwards everything else untouched. The worker (aiokafka) uses the same address.
kcat partitions with `murmur2_random`, the partitioner of the Java client and aiokafka, so a
conversation lands on the same partition whichever of them produces it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from schemas.events import OUTBOUND_EVENT_ADAPTER, EmbeddingEvent, TurnEvent
from devtools.localstack import HOST, TansuBroker

from support.kafka_compat_proxy import KafkaCompatProxy
from support.oracle import Outputs, compare, compute_expected, load_states, read_dead_letters
from support.traffic import BASE_TIME, TopicMaker, Workers, pipeline_env, random_messages
from support.workers import WorkerProc, free_port

import random
from datetime import timedelta

KCAT = shutil.which("kcat") or shutil.which("kafkacat")
TIMEOUT = 300.0
pytestmark = pytest.mark.peer("kcat", "kcat", "kafkacat")


class _AdvertisedBroker(TansuBroker):
    """tansu telling clients to connect to `advertised_port` (the proxy) instead of its own."""

    def __init__(self, run_dir: Path, advertised_port: int, **kw) -> None:
        super().__init__(run_dir, port=free_port(), **kw)
        self.advertised_port = advertised_port

    def command(self) -> list[str]:
        cmd = super().command()
        cmd[cmd.index("--advertised-listener-url") + 1] = f"tcp://{HOST}:{self.advertised_port}"
        return cmd


@pytest.fixture(scope="module")
def kcat_bootstrap(tmp_path_factory: pytest.TempPathFactory):
    proxy_port = free_port()
    broker = _AdvertisedBroker(tmp_path_factory.mktemp("kcat-broker"), proxy_port, die_with_parent=True)
    proxy = KafkaCompatProxy(proxy_port, broker.port).start()
    try:
        broker.start()
        yield f"{HOST}:{proxy_port}", proxy
    finally:
        broker.stop()
        proxy.stop()


def _kcat(bootstrap: str, *args: str, data: bytes | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([KCAT, "-b", bootstrap, "-X", "partitioner=murmur2_random", *args], input=data,
                          capture_output=True, timeout=timeout)


def test_kcat_produced_turns_embedded_like_offline_and_consumed_by_kcat(
        kcat_bootstrap, redis_url: str, tmp_path: Path) -> None:
    bootstrap, proxy = kcat_bootstrap
    topics = TopicMaker(bootstrap, "kcat")
    procs = Workers()
    try:
        penv = pipeline_env(topics, bootstrap, redis_url, partitions=2,
                            extra={"EVOSTREAM_API_AUTH": "off", "EVOSTREAM_OUTPUT_COMPRESSION": "zstd"})
        rng = random.Random(13)
        turns = [TurnEvent(conversation_id=cid, seq=s, messages=random_messages(rng, words=(2, 10), long_turn_p=0),
                           timestamp=BASE_TIME + timedelta(seconds=s))
                 for cid in ("kcat-a", "kcat-b") for s in range(3)]
        lines = b"".join(t.conversation_id.encode() + b"\t" + t.model_dump_json().encode() + b"\n" for t in turns)
        assert b"\t" not in b"".join(t.model_dump_json().encode() for t in turns)
        produced = _kcat(bootstrap, "-P", "-t", penv.turns_topic, "-z", "zstd", "-K", "\t", data=lines)
        assert produced.returncode == 0, produced.stderr.decode()

        worker = procs.add(WorkerProc(penv, tmp_path, "kcat").start())
        expected = compute_expected({cid: [t.to_turn_input() for t in turns if t.conversation_id == cid]
                                     for cid in ("kcat-a", "kcat-b")})
        deadline = time.monotonic() + TIMEOUT
        while True:  # consume with kcat until every embedding is there
            consumed = _kcat(bootstrap, "-C", "-t", penv.embeddings_topic, "-e", "-o", "beginning",
                             "-f", "%k\t%s\n")
            assert consumed.returncode == 0, consumed.stderr.decode()
            outputs = Outputs()
            for line in consumed.stdout.splitlines():
                key, _, value = line.partition(b"\t")
                ev = OUTBOUND_EVENT_ADAPTER.validate_json(value)
                outputs.keys_of_records.append((key, ev.conversation_id))
                if isinstance(ev, EmbeddingEvent):
                    outputs.embeddings[(ev.conversation_id, ev.seq)].append(ev)
            if expected.keys() <= set(outputs.embeddings):
                break
            assert worker.alive(), worker.tail()
            assert time.monotonic() < deadline, f"kcat saw {sorted(outputs.embeddings)} after {TIMEOUT}s"
            time.sleep(1)

        rep = compare(outputs, expected, states=load_states(penv, expected.states))
        assert not rep.problems(allow_duplicates=False), rep.summary() + "\n" + worker.tail()
        assert rep.events == 6 and rep.states_checked == 2
        assert read_dead_letters(bootstrap, penv.dead_letter_topic) == []
        assert proxy.downgraded >= 2  # kcat really went through the documented fallback
    finally:
        procs.stop_all()
        topics.close()
