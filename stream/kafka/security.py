"""Kafka client security (TLS, SASL) from Settings, for EVERY Kafka client evostream makes.

Why one module: the worker's faust consumer and producer, the emitter, `evostream produce`,
`evostream topics` and the indexer must all reach the same managed cluster (Confluent Cloud,
MSK, Aiven, Strimzi) with the same credentials. Each builds its aiokafka client from
`KafkaSecurity.client_kwargs()` (or faust's `broker_credentials` from
`KafkaSecurity.faust_credentials()`), so a new client cannot forget a setting.

Credentials can come from files (`*_file` settings) so that Kubernetes secrets mounted as
files work without putting secrets into environment variables. Files are read once when the
settings are turned into a `KafkaSecurity` (a rotated password needs a restart), except the
OAUTHBEARER token file, which is re-read on every authentication because tokens expire.

`describe_connect_error` turns the unhelpful "Unable to bootstrap from [...]" into one line
that says what failed: TCP, the TLS handshake (with OpenSSL's reason: unknown CA, hostname
mismatch), or authentication.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka.abc import AbstractTokenProvider
from aiokafka.errors import KafkaError

__all__ = ["FileTokenProvider", "KafkaSecurity", "KafkaSecurityError", "describe_connect_error"]

PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER")


class KafkaSecurityError(ValueError):
    """The Kafka security settings are inconsistent or a file they name cannot be read."""


def _read_secret(path: str, what: str) -> str:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise KafkaSecurityError(f"cannot read {what} from {path}: {exc.strerror or exc}") from None
    # Secrets mounted from Kubernetes or written by `echo` end with a newline that is not part
    # of the secret.
    value = text.rstrip("\r\n")
    if not value:
        raise KafkaSecurityError(f"{what} file {path} is empty")
    return value


class FileTokenProvider(AbstractTokenProvider):
    """OAUTHBEARER token read from a file on every authentication (a sidecar or the platform
    keeps the file fresh, e.g. a Kubernetes projected service-account token)."""

    def __init__(self, path: str) -> None:
        self.path = path

    async def token(self) -> str:
        return await asyncio.get_running_loop().run_in_executor(
            None, _read_secret, self.path, "OAUTHBEARER token")


@dataclass(frozen=True)
class KafkaSecurity:
    """Resolved security settings (secrets already read from their files)."""

    protocol: str = "PLAINTEXT"
    mechanism: str = "PLAIN"
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    oauth_token_file: str | None = None
    cafile: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    key_password: str | None = field(default=None, repr=False)
    check_hostname: bool = True

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise KafkaSecurityError(f"kafka_security_protocol must be one of {', '.join(PROTOCOLS)}, "
                                     f"got {self.protocol!r}")
        if self.sasl and self.mechanism not in MECHANISMS:
            raise KafkaSecurityError(f"kafka_sasl_mechanism must be one of {', '.join(MECHANISMS)}, "
                                     f"got {self.mechanism!r}")
        if self.sasl and self.mechanism == "OAUTHBEARER":
            if not self.oauth_token_file:
                raise KafkaSecurityError("kafka_sasl_mechanism=OAUTHBEARER needs kafka_sasl_oauth_token_file")
        elif self.sasl and (not self.username or self.password is None):
            raise KafkaSecurityError(f"{self.protocol} with {self.mechanism} needs a username and a password "
                                     "(kafka_sasl_username[_file], kafka_sasl_password[_file])")
        if self.keyfile and not self.certfile:
            raise KafkaSecurityError("kafka_ssl_keyfile is set without kafka_ssl_certfile")
        tls_files = [f for f in (self.cafile, self.certfile, self.keyfile) if f]
        if tls_files and not self.tls:
            raise KafkaSecurityError(f"TLS files are set but kafka_security_protocol={self.protocol} does not use "
                                     "TLS (use SSL or SASL_SSL)")

    # --- construction ---------------------------------------------------------------------
    @classmethod
    def from_settings(cls, s: Any) -> "KafkaSecurity":
        """From a `stream.settings.Settings` (reads the `*_file` secrets now)."""
        username = s.kafka_sasl_username
        if s.kafka_sasl_username_file:
            username = _read_secret(s.kafka_sasl_username_file, "SASL username")
        password = s.kafka_sasl_password.get_secret_value() if s.kafka_sasl_password is not None else None
        if s.kafka_sasl_password_file:
            password = _read_secret(s.kafka_sasl_password_file, "SASL password")
        key_password = (_read_secret(s.kafka_ssl_key_password_file, "TLS key password")
                        if s.kafka_ssl_key_password_file else None)
        return cls(protocol=s.kafka_security_protocol, mechanism=s.kafka_sasl_mechanism, username=username,
                   password=password, oauth_token_file=s.kafka_sasl_oauth_token_file, cafile=s.kafka_ssl_cafile,
                   certfile=s.kafka_ssl_certfile, keyfile=s.kafka_ssl_keyfile, key_password=key_password,
                   check_hostname=s.kafka_ssl_check_hostname)

    # --- properties -------------------------------------------------------------------------
    @property
    def tls(self) -> bool:
        return self.protocol in ("SSL", "SASL_SSL")

    @property
    def sasl(self) -> bool:
        return self.protocol in ("SASL_PLAINTEXT", "SASL_SSL")

    def describe(self) -> str:
        """For logs and error lines: what is used, never a secret."""
        parts = [self.protocol]
        if self.sasl:
            parts.append(self.mechanism + (f" as {self.username}" if self.username else ""))
        if self.tls:
            parts.append(f"CA {self.cafile or 'system'}" + ("" if self.check_hostname else ", hostname not checked"))
            if self.certfile:
                parts.append("client certificate")
        return ", ".join(parts)

    # --- client arguments ---------------------------------------------------------------------
    def ssl_context(self) -> ssl.SSLContext | None:
        """A verifying TLS context (None for plaintext protocols).

        Built by us rather than by `aiokafka.helpers.create_ssl_context` because that one
        cannot turn hostname checking off (needed when brokers advertise IPs or names their
        certificates do not list); verification of the chain always stays on."""
        if not self.tls:
            return None
        try:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.cafile)
            ctx.check_hostname = self.check_hostname
            if self.certfile:
                ctx.load_cert_chain(self.certfile, self.keyfile, password=self.key_password)
        except (OSError, ssl.SSLError) as exc:
            raise KafkaSecurityError(f"cannot load the Kafka TLS files ({self.describe()}): {exc}") from None
        return ctx

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for AIOKafkaProducer / AIOKafkaConsumer / AIOKafkaAdminClient."""
        kw: dict[str, Any] = {"security_protocol": self.protocol}
        ctx = self.ssl_context()
        if ctx is not None:
            kw["ssl_context"] = ctx
        if self.sasl:
            kw["sasl_mechanism"] = self.mechanism
            if self.mechanism == "OAUTHBEARER":
                assert self.oauth_token_file is not None
                kw["sasl_oauth_token_provider"] = FileTokenProvider(self.oauth_token_file)
            else:
                kw["sasl_plain_username"] = self.username
                kw["sasl_plain_password"] = self.password
        return kw

    def faust_credentials(self) -> Any:
        """faust's `broker_credentials` for the worker's consumer and producer (None = plaintext).

        faust derives its aiokafka arguments from these (credentials_to_aiokafka_auth), so the
        worker's consumer and producer get exactly what `client_kwargs` gives other clients."""
        # lazily: faust costs about a second to import, and only the worker needs it
        from faust.auth import OAuthCredentials, SASLCredentials, SSLCredentials

        ctx = self.ssl_context()
        if self.sasl:
            if self.mechanism == "OAUTHBEARER":
                assert self.oauth_token_file is not None
                return OAuthCredentials(oauth_cb=FileTokenProvider(self.oauth_token_file), ssl_context=ctx)
            return SASLCredentials(username=self.username, password=self.password, ssl_context=ctx,
                                   mechanism=self.mechanism)
        if ctx is not None:
            return SSLCredentials(ctx)
        return None


async def describe_connect_error(bootstrap: str, security: KafkaSecurity, exc: BaseException,
                                 timeout: float = 5.0) -> str:
    """One line saying why a Kafka client could not connect.

    aiokafka reports every failure as "Unable to bootstrap from [...]" and logs the cause
    elsewhere; we repeat the first step ourselves (TCP, then the TLS handshake with the same
    context) to name it. Authentication errors already carry their reason."""
    host, _, port = bootstrap.split(",")[0].strip().rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    where = f"Kafka at {bootstrap} ({security.describe()})"
    name = type(exc).__name__
    if isinstance(exc, KafkaError) and ("Authentication" in name or "Sasl" in name):
        return f"{where}: authentication failed: {exc}"
    try:
        ctx = security.ssl_context()
    except KafkaSecurityError as err:
        return str(err)
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, int(port), ssl=ctx, server_hostname=host if ctx else None), timeout)
        try:
            if ctx is not None:
                # TLS 1.3 servers refuse a missing/unknown client certificate only after the
                # handshake: a broker sends nothing unprompted, so any answer here is that alert.
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(reader.read(1), 1.0)
        finally:
            writer.close()
    except ssl.SSLCertVerificationError as err:
        return f"{where}: TLS certificate not trusted: {err.verify_message or err.reason}"
    except ssl.SSLError as err:
        return f"{where}: TLS handshake failed: {err.reason or err}"
    except (OSError, asyncio.TimeoutError) as err:
        return f"{where}: cannot connect: {err or type(err).__name__}"
    if security.sasl:
        who = f" as {security.username}" if security.username else ""
        return (f"{where}: the connection works but SASL {security.mechanism} authentication{who} failed "
                f"(wrong credentials, or a mechanism the broker does not offer): {exc}")
    return f"{where}: {name}: {exc}"
