"""The test tool behind the durability proof (tests/support/redis_proxy.py): RESP framing, and
a held WAITAOF reply against the session's real Redis (the writes land, the client waits)."""

from __future__ import annotations

import threading

import pytest
import redis

from tests.support.redis_proxy import ProtocolError, RedisProxy, command_name, reply_end


@pytest.mark.parametrize("frame", [
    b"+OK\r\n", b"-ERR x\r\n", b":42\r\n", b"$-1\r\n", b"$3\r\nabc\r\n", b"*-1\r\n", b"*0\r\n",
    b"*2\r\n:1\r\n*2\r\n$1\r\na\r\n:0\r\n", b"%1\r\n+k\r\n:1\r\n", b"_\r\n", b",1.5\r\n", b"#t\r\n",
    b">2\r\n+pubsub\r\n:1\r\n", b"|1\r\n+a\r\n:1\r\n:7\r\n", b"=7\r\ntxt:abc\r\n",
])
def test_reply_end_finds_each_frame_and_waits_for_partial_ones(frame: bytes) -> None:
    assert reply_end(frame + b":9\r\n") == len(frame)
    for cut in range(len(frame)):
        assert reply_end(frame[:cut]) is None, (frame, cut)


def test_command_names_and_bad_bytes() -> None:
    cmd = b"*4\r\n$7\r\nwaitaof\r\n$1\r\n1\r\n$1\r\n0\r\n$4\r\n2000\r\n"
    assert command_name(cmd + b"*1\r\n$4\r\nPING\r\n") == (b"WAITAOF", len(cmd))
    assert command_name(cmd[:-3]) is None
    assert command_name(b"PING\r\n") == (b"PING", 6)
    with pytest.raises(ProtocolError, match="unknown RESP type byte"):
        reply_end(b"?x\r\n")


def test_a_held_waitaof_reply_waits_for_release_while_the_write_has_landed(redis_url: str) -> None:
    direct = redis.Redis.from_url(redis_url)
    port = direct.connection_pool.connection_kwargs["port"]
    key = "redis-proxy-test:{held}"
    direct.delete(key)
    with RedisProxy(port) as proxy:
        client = redis.Redis.from_url(proxy.url, socket_timeout=30)
        assert client.ping()
        proxy.hold()
        done = threading.Event()
        replies: list = []

        def write() -> None:
            pipe = client.pipeline(transaction=False)
            pipe.set(key, b"v")
            pipe.execute_command("WAIT", "0", "1000")
            replies.extend(pipe.execute())
            done.set()

        t = threading.Thread(target=write, daemon=True)
        t.start()
        assert proxy.wait_held(30), "the WAIT reply never reached the proxy"
        assert direct.get(key) == b"v"       # Redis ran the write ...
        assert not done.is_set()              # ... the client has not heard back
        proxy.release()
        assert done.wait(30) and replies[0] is True
        assert proxy.commands["WAIT"] == 1 and proxy.held_replies == 1
        client.close()
    direct.delete(key)
    direct.close()
