"""The API listener speaks TLS 1.2 and 1.3 only, with forward-secret AEAD suites, and no
plaintext (control NS-1). Judged by Python's OpenSSL, an independent TLS stack."""

from __future__ import annotations

import socket
import ssl
from urllib.parse import urlsplit

import pytest


def _address(server):
    url = urlsplit(server.endpoint)
    return url.hostname, url.port


def _handshake(server, context: ssl.SSLContext):
    host, port = _address(server)
    with socket.create_connection((host, port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=host) as tls:
            return tls.version(), tls.cipher()


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_tls_1_2_and_1_3_handshake_with_the_generated_ca_and_an_aead_suite(server, version):
    context = ssl.create_default_context(cafile=server.ca_path)
    context.minimum_version = version
    context.maximum_version = version
    negotiated, (cipher, _, _) = _handshake(server, context)
    assert negotiated == {ssl.TLSVersion.TLSv1_2: "TLSv1.2", ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[version]
    assert "GCM" in cipher or "CHACHA20" in cipher, cipher
    if version == ssl.TLSVersion.TLSv1_2:
        assert cipher.startswith("ECDHE"), f"{cipher} is not forward secret"


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning")
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
def test_tls_1_0_and_1_1_are_refused_by_the_server(server, version):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(server.ca_path)
    context.set_ciphers("ALL:@SECLEVEL=0")
    context.minimum_version = version
    context.maximum_version = version
    with pytest.raises(ssl.SSLError) as refused:
        _handshake(server, context)
    # An alert means the client offered the old version and the server said no; a local
    # refusal by the client's OpenSSL would prove nothing about the server.
    assert "ALERT" in str(refused.value), refused.value


@pytest.mark.parametrize("cipher", ["AES128-SHA", "AES256-GCM-SHA384", "ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES256-SHA384"])
def test_cbc_and_non_forward_secret_tls_1_2_suites_are_refused_by_the_server(server, cipher):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(server.ca_path)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(cipher)
    with pytest.raises(ssl.SSLError) as refused:
        _handshake(server, context)
    assert "ALERT" in str(refused.value), refused.value


def test_a_client_that_does_not_trust_the_ca_cannot_connect(server):
    context = ssl.create_default_context()  # the system roots only
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(server, context)


def test_plaintext_http_gets_no_answer(server):
    host, port = _address(server)
    with socket.create_connection((host, port), timeout=10) as raw:
        raw.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        raw.settimeout(5)
        try:
            data = raw.recv(4096)
        except (ConnectionResetError, TimeoutError, socket.timeout):
            data = b""
    assert b"HTTP/1.1 200" not in data and b"ok" not in data
