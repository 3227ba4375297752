"""Fixtures for the end-to-end tests against the official Azure Digital Twins Python SDK.

A real `twinguard serve` runs for the whole module on a fresh data directory and port 0. The SDK
authenticates with the admin client credential that the server writes on first start, through a
small client-credentials `TokenCredential`, and trusts the data directory's CA.

Environment:
  TWINGUARD_BIN           server binary (default: target/debug/twinguard under the repo root)
  TWINGUARD_TEST_CLUSTER  1: the shared `server` is three nodes on PostgreSQL behind HAProxy
"""

from __future__ import annotations

import datetime
import json
import os
import queue
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from requests.adapters import HTTPAdapter
from azure.core.credentials import AccessToken
from azure.digitaltwins.core import DigitalTwinsClient
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

REPO_ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 60
SHUTDOWN_TIMEOUT_S = 10
HTTP_TIMEOUT_S = 30
LISTENING_PREFIX = "twinguard: api listening on "
DEVICE_PREFIX = "twinguard: device plane listening on "


class ClientSecretCredential:
    """OAuth 2.0 client-credentials grant against twinguard's token endpoint (azure-core's
    `TokenCredential` protocol). Tokens are cached until shortly before they expire."""

    def __init__(self, token_endpoint: str, client_id: str, client_secret: str, ca_path: str,
                 session: requests.Session | None = None):
        self._endpoint = token_endpoint
        self._session = session or requests.Session()
        self._client_id = client_id
        self._client_secret = client_secret
        self._ca_path = ca_path
        self._cached: AccessToken | None = None
        self.requests_made = 0

    def get_token(self, *scopes: str, **kwargs) -> AccessToken:
        if self._cached is not None and self._cached.expires_on - 60 > time.time():
            return self._cached
        response = self._session.post(
            self._endpoint,
            data={
                "grant_type": "client_credentials",
                "client_id": self._client_id,
                "client_secret": self._client_secret,
                "scope": " ".join(scopes),
            },
            verify=self._ca_path,
            timeout=HTTP_TIMEOUT_S,
        )
        self.requests_made += 1
        response.raise_for_status()
        body = response.json()
        assert body["token_type"].lower() == "bearer", body
        self._cached = AccessToken(body["access_token"], int(time.time()) + int(body["expires_in"]))
        return self._cached


class StaticTokenCredential:
    """Hands out a fixed (for example, forged) bearer token."""

    def __init__(self, token: str):
        self._token = token

    def get_token(self, *scopes: str, **kwargs) -> AccessToken:
        return AccessToken(self._token, int(time.time()) + 3600)


@dataclass
class Server:
    endpoint: str
    data_dir: Path
    ca_path: str
    client_id: str
    client_secret: str
    token_endpoint: str
    stderr_path: Path
    device_endpoint: str | None = None
    # The server process, for tests that kill it.
    process: subprocess.Popen | None = None

    def credential(self) -> ClientSecretCredential:
        return ClientSecretCredential(
            self.token_endpoint, self.client_id, self.client_secret, self.ca_path, self.session()
        )

    def client(self, credential=None, **options) -> DigitalTwinsClient:
        """The official SDK client; `options` (retries, say) override the tests' defaults."""
        return DigitalTwinsClient(
            self.endpoint,
            credential or self.credential(),
            connection_verify=self.ca_path,
            per_call_policies=self.client_policies(),
            **{"connection_timeout": HTTP_TIMEOUT_S, "read_timeout": HTTP_TIMEOUT_S, "retry_total": 0, **options},
        )

    def client_policies(self) -> list:
        """Pipeline policies every SDK client of this server runs (none for one node)."""
        return []

    def session(self, source_address: str | None = None) -> requests.Session:
        """A `requests` session for the tests' own calls to this server (connecting from
        `source_address` if given); through a cluster, one that reads its writes anywhere."""
        return session_from(source_address)

    def metrics(self, token: str | None = None) -> str:
        """The Prometheus text of every node serving the tests (one here), read with `token`
        or a new one."""
        return metrics_of(self.endpoint, token or self.credential().get_token().token, self.ca_path)

    def log_tail(self, max_chars: int = 20000) -> str:
        try:
            text = self.stderr_path.read_text(errors="replace")
        except OSError as e:
            return f"(server log unreadable: {e})"
        return text[-max_chars:]


def _binary() -> Path:
    configured = os.environ.get("TWINGUARD_BIN")
    path = Path(configured) if configured else Path("target/debug/twinguard")
    if not path.is_absolute():
        path = REPO_ROOT / path
    if not path.is_file():
        pytest.exit(f"twinguard binary not found at {path}; run `cargo build -p twinguard` or set TWINGUARD_BIN", 2)
    return path


def _read_lines(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=SHUTDOWN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=SHUTDOWN_TIMEOUT_S)


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """The server the tests share: one node, or with TWINGUARD_TEST_CLUSTER=1 three nodes on one
    PostgreSQL database behind HAProxy (`cluster.py`)."""
    yield from serve_shared(tmp_path_factory)


def serve_shared(tmp_path_factory, extra_args=()):
    """A server that a module's tests share, started with `serve ... EXTRA_ARGS`: one node, or
    with TWINGUARD_TEST_CLUSTER=1 three nodes on one PostgreSQL database behind HAProxy, each
    given EXTRA_ARGS."""
    if os.environ.get("TWINGUARD_TEST_CLUSTER") == "1":
        from cluster import Cluster

        cluster = Cluster(tmp_path_factory.mktemp("cluster"), extra_args=extra_args)
        try:
            cluster.start()
            yield cluster.server()
        finally:
            cluster.close()
    else:
        yield from _serve(tmp_path_factory, extra_args)


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    """A server of its own for fuzzers, whose failed token requests would otherwise make the
    shared server back off from 127.0.0.1 for the tests that follow. One node even in the cluster
    pass: the fuzzer, with the administrator's token, steps the CA's rotation, after which a
    balancer that trusts the CA it was started with takes every node out."""
    yield from _serve(tmp_path_factory)


def launch(data_dir: Path, stderr_path: Path, args) -> tuple[subprocess.Popen, str, str | None]:
    """Runs `twinguard serve --data-dir DATA_DIR ARGS` and waits until it listens: the process,
    its API endpoint and its device plane endpoint (None with `--device-listen off`)."""
    with open(stderr_path, "ab") as stderr_file:
        process = subprocess.Popen(
            [str(_binary()), "serve", "--data-dir", str(data_dir), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr_file,
            text=True,
            env={**os.environ, "TWINGUARD_LOG": os.environ.get("TWINGUARD_LOG", "info")},
        )
    try:
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=_read_lines, args=(process.stdout, lines), daemon=True).start()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        endpoint = None
        while endpoint is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no '{LISTENING_PREFIX}' line within {STARTUP_TIMEOUT_S}s")
            try:
                line = lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise RuntimeError(f"twinguard exited with {process.wait(timeout=5)} before listening")
            if line.startswith(LISTENING_PREFIX):
                endpoint = line[len(LISTENING_PREFIX):].strip()
        device_endpoint = None
        while device_endpoint is None and "off" not in args:
            line = lines.get(timeout=max(deadline - time.monotonic(), 0.1))
            if line is None:
                raise RuntimeError("twinguard exited before its device plane listened")
            if line.startswith(DEVICE_PREFIX):
                device_endpoint = line[len(DEVICE_PREFIX):].strip()
        assert endpoint.startswith("https://"), endpoint
    except BaseException:
        stop(process)
        print("---- twinguard stderr ----")
        print(stderr_path.read_text(errors="replace")[-20000:])
        raise
    return process, endpoint, device_endpoint


def _serve(tmp_path_factory, extra_args=(), data_dir=None):
    """Starts a server on a new data directory, or on `data_dir` to restart one."""
    tmp = tmp_path_factory.mktemp("twinguard")
    data_dir = data_dir or tmp / "data"
    stderr_path = tmp / "server-stderr.jsonl"
    process, endpoint, device_endpoint = launch(
        data_dir, stderr_path, ("--api-listen", "127.0.0.1:0", "--device-listen", "127.0.0.1:0", *extra_args)
    )
    try:
        secrets = json.loads((data_dir / "secrets" / "admin-client.json").read_text())
        srv = Server(
            endpoint=endpoint,
            data_dir=data_dir,
            ca_path=str(data_dir / "tls" / "ca.pem"),
            client_id=secrets["client_id"],
            client_secret=secrets["client_secret"],
            token_endpoint=secrets["token_endpoint"],
            stderr_path=stderr_path,
            device_endpoint=device_endpoint,
            process=process,
        )
    except BaseException:
        stop(process)
        raise
    try:
        yield srv
    finally:
        # Also when the generator is closed early (a test that restarts a server): the code
        # after a bare `yield` would never run then, and the process would outlive the test.
        stop(process)
    assert process.returncode is not None


@pytest.fixture(scope="session")
def client(server) -> DigitalTwinsClient:
    return server.client()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call" and report.failed:
        srv = item.funcargs.get("server")
        if srv is None:
            srv = getattr(item.session, "_twinguard_server", None)
        if srv is not None:
            report.sections.append(("twinguard server log (tail)", srv.log_tail()))
    return report


@pytest.fixture(autouse=True)
def _remember_server(request, server):
    request.session._twinguard_server = server


# For a test that starts servers of its own (restarts, brokers of its own): the cluster pass
# of `scripts/test.sh` runs a module's shared-server tests through the cluster and leaves these
# to the single-node pass.
single_node_only = pytest.mark.skipif(
    os.environ.get("TWINGUARD_TEST_CLUSTER") == "1",
    reason="starts a server of its own; run in the single-node pass",
)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_test_ca(directory, name: str = "localhost"):
    """Writes a throwaway CA (ca.pem) and a server certificate for `name` (cert.pem, key.pem)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "twinguard test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (directory / "ca.pem").write_bytes(ca.public_bytes(pem))
    (directory / "cert.pem").write_bytes(cert.public_bytes(pem))
    (directory / "key.pem").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption())
    )


class FromAddress(HTTPAdapter):
    """Connects from a given local address (any of 127.0.0.0/8 works on loopback)."""

    def __init__(self, address: str):
        self._address = address
        super().__init__()

    def init_poolmanager(self, *args, **kwargs):
        kwargs["source_address"] = (self._address, 0)
        super().init_poolmanager(*args, **kwargs)


_NEXT_ADDRESS = iter(range(1, 250 * 250))


def client_from_new_address(server: Server | None = None) -> requests.Session:
    """A session connecting from a loopback address no other test uses (127.0.x.y, x >= 100),
    made by `server` (see `Server.session`) when given.

    The server counts failed secret checks per source address and a success clears nothing, so
    a test that makes a wrong guess on purpose makes it from an address of its own, leaving the
    shared server's backoff of 127.0.0.1 to the tests that follow untouched."""
    n = next(_NEXT_ADDRESS)
    address = f"127.0.{100 + n // 250}.{1 + n % 250}"
    return server.session(address) if server is not None else session_from(address)


def metrics_of(endpoint: str, token: str, ca_path: str) -> str:
    response = requests.get(f"{endpoint}/metrics", headers={"Authorization": f"Bearer {token}"},
                            verify=ca_path, timeout=HTTP_TIMEOUT_S)
    assert response.status_code == 200, response.text
    return response.text


def session_from(source_address: str | None, session: requests.Session | None = None) -> requests.Session:
    """`session` (a new one if not given), connecting from `source_address` if given."""
    session = session or requests.Session()
    if source_address:
        session.mount("https://", FromAddress(source_address))
    return session
