"""TLS: the server on loopback with a certificate the test issues from its own CA; the
``openai`` client trusts that CA. With ``--ssl-ca-certs`` (mTLS) a client without a
certificate is refused at the handshake."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from pathlib import Path
from typing import Any

import httpx
import pytest
from serve_support import FakeEngine

from modelkiln.security.serving import SecurityPolicy
from modelkiln.serve import ModelServer, ServeConfig


def _pem_key(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _issue(tmp: Path, name: str, ca: tuple[Any, Any] | None, server: bool) -> tuple[Any, Any]:
    """A P-256 key and certificate (self-signed CA when ``ca`` is None), written as PEM."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    issuer_key, issuer_cert = ca if ca else (key, None)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_cert.subject if issuer_cert else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca is None, path_length=None), critical=True)
    )
    if server:
        san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
        builder = builder.add_extension(san, critical=False).add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
    elif ca is not None:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    cert = builder.sign(issuer_key, hashes.SHA256())
    (tmp / f"{name}.key").write_bytes(_pem_key(key))
    (tmp / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


def _server(tmp: Path, **tls: Any) -> ModelServer:
    cfg = ServeConfig.model_validate(
        {"models": [{"path": "fake", "name": "lm"}], "port": 0, "drain_timeout_s": 2}
    )
    opts = {"ssl_certfile": str(tmp / "server.pem"), "ssl_keyfile": str(tmp / "server.key")} | tls
    policy = SecurityPolicy(uvicorn_options=opts)
    return ModelServer(config=cfg, engines={"lm": FakeEngine()}, hooks=policy.hooks())


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    ca = _issue(tmp_path, "ca", None, server=False)
    _issue(tmp_path, "server", ca, server=True)
    _issue(tmp_path, "client", ca, server=False)
    return tmp_path


def test_openai_client_over_tls_with_the_test_ca(pki: Path) -> None:
    import openai

    server = _server(pki)
    server.start(timeout=30)
    try:
        url = server.url.replace("http://", "https://")
        ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        client = openai.OpenAI(
            base_url=url + "/v1", api_key="unused", http_client=httpx.Client(verify=ctx, timeout=10)
        )
        with client:  # closing it ends the keep-alive connection before the drain
            out = client.completions.create(model="lm", prompt="def f(", max_tokens=3)
        assert out.choices[0].text
        with pytest.raises(httpx.ConnectError):  # the system CAs do not know the test CA
            httpx.get(url + "/health", timeout=5)
        with pytest.raises(httpx.RemoteProtocolError):  # plain HTTP to a TLS port
            httpx.get(server.url + "/health", timeout=5)
    finally:
        server.stop()


def test_mtls_requires_a_client_certificate(pki: Path) -> None:
    server = _server(pki, ssl_ca_certs=str(pki / "ca.pem"), ssl_cert_reqs=ssl.CERT_REQUIRED)
    server.start(timeout=30)
    try:
        url = server.url.replace("http://", "https://")
        anonymous = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
            httpx.get(url + "/health", verify=anonymous, timeout=5)
        with_cert = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        with_cert.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
        assert httpx.get(url + "/health", verify=with_cert, timeout=5).status_code == 200
    finally:
        server.stop()
