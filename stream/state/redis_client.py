"""One Redis client factory for every topology a deployment uses, through redis-py's own classes.

Why: managed Redis comes as a single server (`redis://`, `rediss://` with TLS, ACL users in the
URL), as a Sentinel-managed primary (self-hosted HA), or as a Redis Cluster (ElastiCache cluster
mode, Memorystore cluster). The checkpoint store (and `evostream inspect`) take one URL:

    redis://[user:pass@]host:port/db              standalone
    rediss://[user:pass@]host:port/db             standalone over TLS
    redis+sentinel://[user:pass@]h1:26379,h2:26379/<service>[/db]
    rediss+sentinel://...                          TLS to the sentinels and the primary
    redis+cluster://[user:pass@]h1:6379,h2:6379   (any subset of the nodes: the rest is discovered)
    rediss+cluster://...                           cluster over TLS

Cluster: redis-py follows MOVED and ASK itself (slot migrations, failovers); what it cannot
absorb surfaces as a retryable error (TRYAGAIN while a slot is half moved, CLUSTERDOWN during a
failover) that the store turns into StoreUnavailable (pause, retry the batch), never an exit.
Every Lua script touches the keys of ONE conversation, which share a hash tag and so a slot.
redis-py's cluster pipeline refuses EVALSHA outright (a script could touch keys on several
nodes); ours are single-slot by construction, so `ScriptClusterPipeline` routes them by their
keys like any keyed command.

Secrets: `password_file` (e.g. a mounted Kubernetes secret) replaces the URL's password.
TLS: the CA / client certificate / key files apply to `rediss*` URLs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.asyncio.sentinel import Sentinel

__all__ = ["RedisOptions", "RedisUrlError", "ScriptClusterPipeline", "ScriptingRedisCluster", "describe_url",
           "make_redis"]

SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")


class RedisUrlError(ValueError):
    """The Redis URL or options cannot be turned into a client."""


@dataclass(frozen=True)
class RedisOptions:
    """Client options that do not belong in a URL (secret files, TLS files)."""

    password_file: str | None = None
    sentinel_password_file: str | None = None
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_check_hostname: bool = True

    @classmethod
    def from_settings(cls, s: Any) -> "RedisOptions":
        return cls(password_file=s.redis_password_file, sentinel_password_file=s.redis_sentinel_password_file,
                   tls_ca_file=s.redis_tls_ca_file, tls_cert_file=s.redis_tls_cert_file,
                   tls_key_file=s.redis_tls_key_file, tls_check_hostname=s.redis_tls_check_hostname)


def _secret(path: str, what: str) -> str:
    try:
        value = Path(path).read_text().rstrip("\r\n")
    except OSError as exc:
        raise RedisUrlError(f"cannot read the Redis {what} from {path}: {exc.strerror or exc}") from None
    if not value:
        raise RedisUrlError(f"the Redis {what} file {path} is empty")
    return value


def _hosts(netloc: str, default_port: int) -> tuple[str | None, str | None, list[tuple[str, int]]]:
    userinfo, _, hostlist = netloc.rpartition("@")
    user = password = None
    if userinfo:
        u, sep, p = userinfo.partition(":")
        user, password = (unquote(u) or None), (unquote(p) if sep else None)
    hosts = []
    for item in hostlist.split(","):
        item = item.strip()
        if not item:
            continue
        if item.startswith("["):  # [ipv6]:port
            host, _, rest = item[1:].partition("]")
            port = int(rest[1:]) if rest.startswith(":") else default_port
        else:
            host, sep, p = item.rpartition(":")
            host, port = (host, int(p)) if sep else (item, default_port)
        hosts.append((host, port))
    if not hosts:
        raise RedisUrlError("no host in the Redis URL")
    return user, password, hosts


def describe_url(url: str) -> str:
    """The URL without credentials, for logs and error messages."""
    u = urlsplit(url)
    hosts = u.netloc.rpartition("@")[2]
    return f"{u.scheme}://{hosts}{u.path}"


def _tls_kwargs(o: RedisOptions) -> dict[str, Any]:
    kw: dict[str, Any] = {"ssl_cert_reqs": "required", "ssl_check_hostname": o.tls_check_hostname}
    if o.tls_ca_file:
        kw["ssl_ca_certs"] = o.tls_ca_file
    if o.tls_cert_file:
        kw["ssl_certfile"] = o.tls_cert_file
    if o.tls_key_file:
        kw["ssl_keyfile"] = o.tls_key_file
    return kw


def make_redis(url: str, options: RedisOptions | None = None, **client_kwargs: Any) -> Any:
    """An asyncio client for `url` (see module docstring); `client_kwargs` (timeouts, retry)
    apply to every connection it makes."""
    o = options or RedisOptions()
    u = urlsplit(url)
    scheme = u.scheme.lower()
    tls = scheme.startswith("rediss")
    if tls:
        client_kwargs.update(_tls_kwargs(o))
    elif o.tls_cert_file or o.tls_key_file:
        raise RedisUrlError(f"Redis TLS files are set but the URL {describe_url(url)} is not rediss://")
    password = _secret(o.password_file, "password") if o.password_file else None

    if scheme in ("redis", "rediss", "unix"):
        if password is not None:
            client_kwargs["password"] = password
        return Redis.from_url(url, **client_kwargs)

    user, url_password, hosts = _hosts(u.netloc, 26379 if scheme in SENTINEL_SCHEMES else 6379)
    password = password if password is not None else url_password
    auth = {k: v for k, v in (("username", user), ("password", password)) if v is not None}

    if scheme in CLUSTER_SCHEMES:
        if u.path.strip("/") not in ("", "0"):
            raise RedisUrlError("Redis Cluster has only database 0")
        if tls:
            client_kwargs["ssl"] = True
        return ScriptingRedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in hosts], **auth, **client_kwargs)

    if scheme in SENTINEL_SCHEMES:
        parts = [p for p in u.path.split("/") if p]
        if not parts:
            raise RedisUrlError("a Sentinel URL names the service: redis+sentinel://host:26379/<service>[/db]")
        service, db = parts[0], int(parts[1]) if len(parts) > 1 else 0
        q = parse_qs(u.query)
        sentinel_kwargs: dict[str, Any] = {k: v for k, v in client_kwargs.items()
                                           if k.startswith("socket_") or k.startswith("ssl")}
        if tls:
            client_kwargs["ssl"] = True
            sentinel_kwargs["ssl"] = True
        if o.sentinel_password_file:
            sentinel_kwargs["password"] = _secret(o.sentinel_password_file, "sentinel password")
        elif q.get("sentinel_username") or q.get("sentinel_auth") == ["same"]:
            sentinel_kwargs.update(auth)
        sentinel = Sentinel(hosts, sentinel_kwargs=sentinel_kwargs, **auth, **client_kwargs)
        return sentinel.master_for(service, db=db)

    raise RedisUrlError(f"unsupported Redis URL scheme {u.scheme!r} in {describe_url(url)}: use redis://, "
                        "rediss://, unix://, redis+sentinel://, rediss+sentinel://, redis+cluster:// or rediss+cluster://")


# --------------------------------------------------------------------------------------------
# Cluster: pipelines that carry single-slot scripts


class ScriptClusterPipeline(ClusterPipeline):
    """A cluster pipeline that accepts EVALSHA (routed by its keys, which must share a slot;
    redis-py checks that and raises otherwise) and refuses the durability waits, which in a
    cluster would go to a random node instead of the ones that took the writes."""

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> "ScriptClusterPipeline":
        if numkeys < 1:
            raise RedisUrlError("a script run through a cluster pipeline must name its keys")
        return self.execute_command("EVALSHA", sha, numkeys, *keys_and_args)

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        if args and str(args[0]).upper() in ("WAIT", "WAITAOF"):
            raise RedisUrlError(
                f"{args[0]} after a pipeline is not supported with Redis Cluster (it would reach one random "
                "node); use EVOSTREAM_REDIS_DURABILITY=reply with a cluster")
        return super().execute_command(*args, **kwargs)


class ScriptingRedisCluster(RedisCluster):
    """RedisCluster whose non-transactional pipelines accept single-slot EVALSHA."""

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> ClusterPipeline:
        if transaction or shard_hint:
            return super().pipeline(transaction, shard_hint)
        return ScriptClusterPipeline(self, transaction)
