"""Expected failures of the command line: one clear line and a documented exit code each.

Why a classifier instead of try/except in every command: the same failure (no broker, Redis
refusing a password, a checkpoint that is not there) surfaces from many commands and through
several libraries' exception types (aiokafka, redis-py, huggingface_hub, our own wrappers).
`explain` walks an exception and its causes and turns the first one it recognises into a
`CliError`; anything it does not recognise is a bug, reported as such (exit 70), with the
traceback only under `--debug`.
"""

from __future__ import annotations

import re
import ssl
from enum import IntEnum
from typing import Iterator


class ExitCode(IntEnum):
    """Exit codes of `evostream` (README "Exit codes" and `evostream --help` list them)."""

    OK = 0
    FAILED = 1          # the command ran and the answer is no (no such checkpoint, query rejected)
    USAGE = 2           # bad flags, bad or unknown EVOSTREAM_* setting, missing settings file
    BROKER = 3          # Kafka broker unreachable, or a topic it needs is missing
    REDIS = 4           # Redis unreachable
    AUTH = 5            # credentials refused (Kafka SASL/TLS, Redis AUTH)
    CHECKPOINT = 6      # model checkpoint missing, invalid, or not in the hub cache
    WORKER = 7          # the worker's HTTP endpoint is unreachable
    INTERNAL = 70       # unexpected error (a bug): rerun with --debug for the traceback
    INTERRUPTED = 130   # Ctrl-C


EXIT_CODE_HELP = "\n".join(f"  {int(c):>3}  {c.name.lower()}: {doc}" for c, doc in (
    (ExitCode.OK, "success"),
    (ExitCode.FAILED, "ran, but the answer is no (e.g. no checkpoint for that conversation)"),
    (ExitCode.USAGE, "bad flag, bad or unknown EVOSTREAM_* setting, missing settings file"),
    (ExitCode.BROKER, "Kafka broker unreachable or a topic missing"),
    (ExitCode.REDIS, "Redis unreachable"),
    (ExitCode.AUTH, "credentials refused (Kafka SASL/TLS, Redis)"),
    (ExitCode.CHECKPOINT, "model checkpoint missing, invalid or not cached"),
    (ExitCode.WORKER, "worker HTTP endpoint unreachable"),
    (ExitCode.INTERNAL, "unexpected error (rerun with --debug)"),
    (ExitCode.INTERRUPTED, "interrupted"),
))


class CliError(Exception):
    """An expected failure: `message` is printed as `error: <message>`, then exit `code`."""

    def __init__(self, message: str, code: ExitCode = ExitCode.FAILED):
        super().__init__(message)
        self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0])


def redact(url: str) -> str:
    """A URL with its password replaced by *** (error messages end up in logs and tickets)."""
    return re.sub(r"(//[^:/@]*:)[^@/]*@", r"\1***@", url)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def explain(exc: BaseException, *, kafka: str | None = None, redis_url: str | None = None) -> CliError:
    """The `CliError` for `exc` (its causes included); INTERNAL when nothing matches."""
    from aiokafka import errors as kerr
    from redis import exceptions as rex

    from stream.clients.produce_stream import InputError
    from stream.clients.query_client import QueryError
    from stream.settings import ConfigFileMissing
    from workers.loading import ModelLoadError

    kafka_where = f"the Kafka broker at {kafka} (EVOSTREAM_KAFKA_BOOTSTRAP)" if kafka else "the Kafka broker"
    redis_where = f"Redis at {redact(redis_url)} (EVOSTREAM_REDIS_URL)" if redis_url else "Redis"
    chain = list(_chain(exc))
    for e in chain:
        if isinstance(e, CliError):
            return e
    for e in chain:  # credentials first: a refused password often arrives wrapped as "unavailable"
        if isinstance(e, rex.AuthenticationError) or (
                isinstance(e, rex.ResponseError) and str(e).split(" ", 1)[0] in ("WRONGPASS", "NOAUTH", "NOPERM")):
            return CliError(f"{redis_where} refused the credentials: {_one_line(e)}", ExitCode.AUTH)
        if isinstance(e, (kerr.SaslAuthenticationFailed, kerr.AuthenticationFailedError,
                          kerr.UnsupportedSaslMechanismError, kerr.TopicAuthorizationFailedError,
                          kerr.GroupAuthorizationFailedError, kerr.ClusterAuthorizationFailedError)):
            return CliError(f"{kafka_where} refused the credentials: {type(e).__name__}: {_one_line(e)}",
                            ExitCode.AUTH)
        if isinstance(e, ssl.SSLError):
            return CliError(f"TLS handshake failed ({kafka_where}): {_one_line(e)}", ExitCode.AUTH)
    for e in chain:
        if isinstance(e, ConfigFileMissing):
            return CliError(str(e), ExitCode.USAGE)
        if isinstance(e, InputError):
            return CliError(f"bad input file: {_one_line(e)}", ExitCode.USAGE)
        if isinstance(e, ModelLoadError):
            return CliError(f"checkpoint: {_one_line(e, 500)}", ExitCode.CHECKPOINT)
        if isinstance(e, QueryError):
            return CliError(_one_line(e, 500), ExitCode.WORKER if e.status is None else ExitCode.FAILED)
        if type(e).__name__ == "TopicNotFound":
            return CliError(f"{_one_line(e)} (create it with `evostream topics`)", ExitCode.BROKER)
        if isinstance(e, (kerr.KafkaConnectionError, kerr.NoBrokersAvailable, kerr.KafkaTimeoutError)) or (
                isinstance(e, TimeoutError) and "Kafka broker" in str(e)):
            return CliError(f"cannot reach {kafka_where}: {_one_line(e)}", ExitCode.BROKER)
        if isinstance(e, (rex.ConnectionError, rex.TimeoutError)) or type(e).__name__ == "StoreUnavailable":
            return CliError(f"cannot reach {redis_where}: {_one_line(e)}", ExitCode.REDIS)
    return CliError(f"unexpected error: {type(exc).__name__}: {_one_line(exc)} (rerun with --debug for the "
                    "traceback, and please report it)", ExitCode.INTERNAL)


__all__ = ["CliError", "EXIT_CODE_HELP", "ExitCode", "explain", "redact"]
