"""Is this Redis fit to hold memory states? Reachability, credentials and server settings.

Checked once at worker start (and pinged by readiness): a server that could lose memory
states silently, or that refuses our credentials, stops the worker with one line, because a
restart loop cannot fix either.
"""

from __future__ import annotations

from redis import exceptions as rex
from redis.asyncio import Redis

from stream.backoff import Backoff
from stream.state.availability import is_unavailable, unavailable_as, wait_until
from stream.state.durability import DurabilityPolicy
from stream.state.errors import UnsafeRedisConfig


class ServerChecks:
    def __init__(self, redis: Redis, durability: DurabilityPolicy, where: str, backoff: Backoff = Backoff()) -> None:
        self.redis = redis
        self.durability = durability
        self.where = where
        self.backoff = backoff

    async def ping(self) -> bool:
        """True if Redis answers now; never raises for an unreachable server."""
        try:
            return bool(await self.redis.ping())
        except Exception as exc:  # noqa: BLE001
            if is_unavailable(exc):
                return False
            raise

    async def wait_until_available(self, max_wait_s: float | None = None) -> None:
        """Block (asynchronously) until Redis answers; exponential backoff with jitter.

        None waits for ever; otherwise StoreUnavailable after `max_wait_s`."""

        async def probe() -> None:
            with unavailable_as(self.where):
                await self.redis.ping()

        await wait_until(probe, what=f"memory-state store ({self.where})", max_wait_s=max_wait_s,
                         backoff=self.backoff)

    async def check_credentials(self) -> None:
        """Raise UnsafeRedisConfig if Redis refuses our credentials (wrong password, an ACL
        user without the needed permissions). redis-py reports those as connection errors,
        which the pipeline would otherwise wait out for ever; any other failure (not reachable
        yet) is left to `wait_until_available`."""
        try:
            await self.redis.ping()
        except (rex.AuthenticationError, rex.AuthorizationError, rex.NoPermissionError,
                rex.AuthenticationWrongNumberOfArgsError) as exc:
            raise UnsafeRedisConfig(
                f"{self.where} refused the configured credentials ({type(exc).__name__}: {exc}); "
                f"check the user and password in EVOSTREAM_REDIS_URL") from exc
        except Exception:  # noqa: BLE001 - unreachable and the like: waited for by the caller
            return

    async def check_server(self, *, allow_eviction: bool = False) -> dict[str, str]:
        """Refuse a server that could lose memory states silently, with the reason and the fix:
        an eviction policy other than `noeviction` (any key with a TTL — all of ours — may be
        evicted alone), or a durability setting the server cannot honour (WAITAOF without
        appendonly). Returns what was read (for the start-up log)."""
        with unavailable_as(f"INFO on {self.where}"):
            mem = await self.redis.info("memory")
            pers = await self.redis.info("persistence")
        policy = str(mem.get("maxmemory_policy", "unknown"))
        aof = str(pers.get("aof_enabled", "0"))
        if policy != "noeviction" and not allow_eviction:
            raise UnsafeRedisConfig(
                f"{self.where} has maxmemory-policy {policy}: Redis may evict one key of a "
                f"conversation and lose or truncate its memory; set maxmemory-policy noeviction "
                f"(or EVOSTREAM_REDIS_ALLOW_EVICTION=true to accept quarantined conversations)")
        if self.durability.needs_aof and aof != "1":
            raise UnsafeRedisConfig(
                f"{self.where} has appendonly off, so EVOSTREAM_REDIS_DURABILITY={self.durability.level.value} "
                f"cannot be honoured; enable appendonly (appendfsync everysec or always) or choose "
                f"another durability")
        return {"maxmemory_policy": policy, "aof_enabled": aof}
