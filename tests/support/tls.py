"""TLS test peers started by the tests themselves: a throwaway PKI (openssl CLI), and a real
Kafka-protocol broker reachable only over TLS.

Why stunnel: the packaged tansu 0.6.0 cannot terminate TLS itself (its --cert/--key refuse to
be used together; measured, see /work/shared/INFRA_NOTES.md). A TLS terminator in front of its
plain port, with tansu advertising the TLS port, gives clients exactly what a TLS Kafka
listener gives them: every connection (bootstrap and the advertised broker address) is TLS, and
a client with the wrong CA fails the handshake. The plain port stays on loopback and is only
used by the terminator.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from stream.kafka.security import KafkaSecurity
from devtools.localstack import HOST, ManagedService, TansuBroker, free_ports
from stream.kafka.topics import wait_for_broker_sync


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@dataclass(frozen=True)
class Pki:
    """A CA, a server certificate for 127.0.0.1/localhost signed by it, a client certificate
    signed by it, and an unrelated CA (for "wrong CA" tests). All PEM files."""

    dir: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca_cert: Path


def make_pki(directory: Path, *, server_names: tuple[str, ...] = ("IP:127.0.0.1", "DNS:localhost")) -> Pki:
    """Generate a fresh PKI with the openssl CLI (EC P-256 keys: fast to make)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)

    def ca(name: str) -> None:
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                 "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN=evostream test {name}",
                 "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
                 cwd=d)

    def leaf(name: str, ext: str) -> None:
        _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN=evostream test {name}", cwd=d)
        (d / f"{name}.ext").write_text(ext)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)

    ca("ca")
    ca("other-ca")
    leaf("server", f"subjectAltName={','.join(server_names)}\nextendedKeyUsage=serverAuth\n")
    leaf("client", "extendedKeyUsage=clientAuth\n")
    return Pki(d, d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem", d / "client.key",
               d / "other-ca.pem")


class Stunnel(ManagedService):
    """stunnel4 terminating TLS on `port` and forwarding to `target_port` on loopback."""

    cmd_marker = "stunnel"

    def __init__(self, run_dir: Path, port: int, target_port: int, pki: Pki, *, name: str = "stunnel",
                 require_client_cert: bool = False) -> None:
        super().__init__(run_dir, port)
        self.name = name
        self.target_port = target_port
        self.pki = pki
        self.require_client_cert = require_client_cert

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def command(self) -> list[str]:
        conf = self.run_dir / f"{self.name}.conf"
        lines = ["foreground = yes", "pid =", "debug = warning", "", "[tls]",
                 f"accept = {HOST}:{self.port}", f"connect = {HOST}:{self.target_port}",
                 f"cert = {self.pki.server_cert}", f"key = {self.pki.server_key}"]
        if self.require_client_cert:
            lines += [f"CAfile = {self.pki.ca_cert}", "verifyChain = yes"]
        conf.write_text("\n".join(lines) + "\n")
        return ["stunnel4", str(conf)]

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection((HOST, self.port), timeout=0.5):
                    return
            except OSError as exc:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"stunnel on {self.port}: {exc}") from exc
                time.sleep(0.05)


class AdvertisingTansu(TansuBroker):
    """tansu listening on its plain port but advertising another one (the TLS terminator's)."""

    def __init__(self, run_dir: Path, port: int, advertised_port: int, *, name: str = "broker") -> None:
        super().__init__(run_dir, port)
        self.name = name
        self.advertised_port = advertised_port

    def command(self) -> list[str]:
        argv = super().command()
        argv[argv.index("--advertised-listener-url") + 1] = f"tcp://{HOST}:{self.advertised_port}"
        return argv

    def wait_ready(self, timeout: float) -> None:
        # A metadata round trip would send the client to the advertised (TLS) port; the
        # terminator's own readiness check does that part.
        Stunnel.wait_ready(self, timeout)  # type: ignore[arg-type]


class TlsKafka:
    """A tansu broker whose only client-facing listener is TLS (stunnel in front).

    `bootstrap` is the TLS address; `security()` gives a client configuration trusting the
    test CA. With `require_client_cert`, clients must also present a certificate signed by it
    (mutual TLS)."""

    def __init__(self, run_dir: Path, pki: Pki, *, require_client_cert: bool = False) -> None:
        plain, tls = free_ports(2)
        self.pki = pki
        self.broker = AdvertisingTansu(run_dir, plain, tls, name="tls-broker")
        self.stunnel = Stunnel(run_dir, tls, plain, pki, name="tls-terminator",
                               require_client_cert=require_client_cert)
        self.require_client_cert = require_client_cert

    @property
    def bootstrap(self) -> str:
        return self.stunnel.address

    def security(self, **overrides: object) -> KafkaSecurity:
        kw: dict = dict(protocol="SSL", cafile=str(self.pki.ca_cert))
        if self.require_client_cert:
            kw.update(certfile=str(self.pki.client_cert), keyfile=str(self.pki.client_key))
        kw.update(overrides)
        return KafkaSecurity(**kw)

    def env(self) -> dict[str, str]:
        """EVOSTREAM_* variables for a client of this broker."""
        e = {"EVOSTREAM_KAFKA_BOOTSTRAP": self.bootstrap, "EVOSTREAM_KAFKA_SECURITY_PROTOCOL": "SSL",
             "EVOSTREAM_KAFKA_SSL_CAFILE": str(self.pki.ca_cert)}
        if self.require_client_cert:
            e.update(EVOSTREAM_KAFKA_SSL_CERTFILE=str(self.pki.client_cert),
                     EVOSTREAM_KAFKA_SSL_KEYFILE=str(self.pki.client_key))
        return e

    def start(self) -> "TlsKafka":
        self.broker.start()
        try:
            self.stunnel.start()
            wait_for_broker_sync(self.bootstrap, 20.0, security=self.security())
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        self.stunnel.stop(grace=2.0)
        self.broker.stop(grace=2.0)

    def __enter__(self) -> "TlsKafka":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def tls_handshake_ok(host: str, port: int, cafile: Path) -> bool:
    """True if a TLS handshake trusting only `cafile` succeeds."""
    ctx = ssl.create_default_context(cafile=str(cafile))
    try:
        with socket.create_connection((host, port), timeout=3) as raw, ctx.wrap_socket(raw, server_hostname=host):
            return True
    except ssl.SSLError:
        return False
