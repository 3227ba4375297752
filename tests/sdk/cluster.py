"""Several twinguard nodes on one PostgreSQL database behind HAProxy, as an operator would run
them on one machine (issue 20).

- A database of its own on the machine's PostgreSQL (127.0.0.1:5432), dropped at the end.
- Node 1 starts on an empty data directory and makes the instance; the others start from a new
  directory holding only the files a node needs of the first's (`instance.json`,
  `secrets/instance.kek`, and the admin credential to administer with).
- HAProxy in TCP mode (TLS stays end to end) balances connections round robin, health-checks
  each node's `/readyz` over verified TLS, retries a connection a dead node refused on another,
  and sends a PROXY protocol v2 header naming the client. It connects to the nodes from
  127.0.0.2, the only address the nodes read such headers from (`--proxy-protocol-from`), so the
  tests can still reach each node directly from 127.0.0.1.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import requests
from azure.core.pipeline.policies import SansIOHTTPPolicy

from conftest import Server, free_port, launch, metrics_of, session_from, stop

POSTGRES = "postgresql://postgres@127.0.0.1:5432"
BALANCER_SOURCE = "127.0.0.2"
# Files a new node needs of the first node's data directory.
NODE_FILES = ("instance.json", "secrets/instance.kek", "secrets/admin-client.json")


class FollowPositions(SansIOHTTPPolicy):
    """Read-your-writes behind a balancer (`docs/consistency.md`): presents the last store
    position this client was answered with (`Twinguard-Position`) on every request, so a node
    that has not applied it yet waits for it. With `new_connections`, also asks for a new
    connection per request (`Connection: close`), so the balancer sends successive requests of
    one client to different nodes."""

    def __init__(self, new_connections: bool = True):
        self.position: str | None = None
        self.new_connections = new_connections

    def on_request(self, request):
        if self.position:
            request.http_request.headers["Twinguard-Min-Position"] = self.position
        if self.new_connections:
            request.http_request.headers["Connection"] = "close"

    def on_response(self, request, response):
        position = response.http_response.headers.get("Twinguard-Position")
        if position:
            self.position = position


class PositionSession(requests.Session):
    """`FollowPositions` for the tests' own `requests` calls: presents the last position any
    client of the cluster was answered with, and asks for a new connection per request."""

    def __init__(self, positions: FollowPositions):
        super().__init__()
        self.positions = positions

    def request(self, method, url, **kwargs):
        headers = dict(kwargs.pop("headers", None) or {})
        if self.positions.position:
            headers.setdefault("Twinguard-Min-Position", self.positions.position)
        headers.setdefault("Connection", "close")
        response = super().request(method, url, headers=headers, **kwargs)
        position = response.headers.get("Twinguard-Position")
        if position:
            self.positions.position = position
        return response


@dataclass
class Node:
    name: str
    data_dir: Path
    api_port: int
    device_port: int
    stderr_path: Path
    process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"https://127.0.0.1:{self.api_port}"

    @property
    def device_endpoint(self) -> str:
        return f"https://127.0.0.1:{self.device_port}"


class Cluster:
    def __init__(self, directory: Path, size: int = 3, extra_args=()):
        self.directory = directory
        # Given to every node's `serve`, after the cluster's own arguments.
        self.extra_args = tuple(extra_args)
        self.database = f"twinguard_cluster_{uuid.uuid4().hex[:12]}"
        self.url = f"{POSTGRES}/{self.database}"
        self.api_port = free_port()
        self.device_port = free_port()
        self.nodes = [
            Node(f"n{i + 1}", directory / f"n{i + 1}", free_port(), free_port(), directory / f"n{i + 1}.jsonl")
            for i in range(size)
        ]
        self.haproxy: subprocess.Popen | None = None
        self.haproxy_log = directory / "haproxy.log"

    @property
    def endpoint(self) -> str:
        return f"https://127.0.0.1:{self.api_port}"

    @property
    def ca_path(self) -> str:
        return str(self.nodes[0].data_dir / "tls" / "ca.pem")

    def start(self) -> None:
        subprocess.run(["createdb", "-h", "127.0.0.1", "-U", "postgres", self.database], check=True)
        self.start_node(0)
        for node in self.nodes[1:]:
            for name in NODE_FILES:
                target = node.data_dir / name
                target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                shutil.copy2(self.nodes[0].data_dir / name, target)
            self.start_node(self.nodes.index(node))
        self._start_haproxy()
        self.wait_until_balanced()

    def start_node(self, index: int) -> None:
        node = self.nodes[index]
        node.process, _, _ = launch(node.data_dir, node.stderr_path, (
            "--store", self.url,
            "--api-listen", f"127.0.0.1:{node.api_port}",
            "--device-listen", f"127.0.0.1:{node.device_port}",
            "--public-url", self.endpoint,
            "--proxy-protocol-from", BALANCER_SOURCE,
            *self.extra_args,
        ))

    def kill(self, index: int) -> None:
        """SIGKILL: the node gets no chance to finish anything."""
        process = self.nodes[index].process
        process.kill()
        process.wait(timeout=10)

    def restart(self, index: int) -> None:
        """SIGTERM, then the same node again on its data directory and ports."""
        stop(self.nodes[index].process)
        self.start_node(index)

    def ready(self, index: int) -> bool:
        try:
            answer = requests.get(f"{self.nodes[index].endpoint}/readyz", verify=self.ca_path, timeout=5)
        except requests.RequestException:
            return False
        return answer.status_code == 200

    def wait_until_balanced(self, timeout_s: float = 60) -> None:
        """Until every running node is ready and HAProxy's checks have seen it up (it counts a
        node up after two good checks half a second apart)."""
        deadline = time.monotonic() + timeout_s
        running = [i for i, node in enumerate(self.nodes) if node.process and node.process.poll() is None]
        while not all(self.ready(i) for i in running):
            assert time.monotonic() < deadline, "the nodes did not become ready"
            time.sleep(0.2)
        time.sleep(1.5)

    def _start_haproxy(self) -> None:
        checks = (
            f"check inter 500ms fall 2 rise 2 check-send-proxy check-ssl verify required "
            f"ca-file {self.ca_path} check-sni localhost verifyhost localhost"
        )

        def backend(name: str, port_of, path: str) -> str:
            servers = "\n".join(
                f"    server {node.name} 127.0.0.1:{port_of(node)} send-proxy-v2 {checks}" for node in self.nodes
            )
            return (
                f"backend {name}\n"
                "    balance roundrobin\n"
                f"    source {BALANCER_SOURCE}\n"
                "    option httpchk\n"
                f"    http-check send meth GET uri {path} ver HTTP/1.1 hdr Host localhost\n"
                "    http-check expect status 200\n"
                f"{servers}\n"
            )

        config = self.directory / "haproxy.cfg"
        config.write_text(
            "global\n"
            "    maxconn 4096\n"
            "defaults\n"
            "    mode tcp\n"
            "    timeout connect 2s\n"
            "    timeout client 120s\n"
            "    timeout server 120s\n"
            "    retries 3\n"
            "    option redispatch\n"
            "frontend api\n"
            f"    bind 127.0.0.1:{self.api_port}\n"
            "    default_backend api_nodes\n"
            "frontend devices\n"
            f"    bind 127.0.0.1:{self.device_port}\n"
            "    default_backend device_nodes\n"
            + backend("api_nodes", lambda n: n.api_port, "/readyz")
            + backend("device_nodes", lambda n: n.device_port, "/healthz")
        )
        with open(self.haproxy_log, "ab") as log:
            self.haproxy = subprocess.Popen(
                ["haproxy", "-db", "-f", str(config)], stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        deadline = time.monotonic() + 10
        while True:
            try:
                requests.get(f"{self.endpoint}/healthz", verify=self.ca_path, timeout=2)
                return
            except requests.RequestException:
                assert self.haproxy.poll() is None, self.haproxy_log.read_text()
                assert time.monotonic() < deadline, "HAProxy does not answer"
                time.sleep(0.2)

    def server(self) -> Server:
        """The cluster as the tests' `Server`: the balancer's endpoints, node 1's data directory
        and log."""
        first = self.nodes[0]
        secrets = json.loads((first.data_dir / "secrets" / "admin-client.json").read_text())
        return ClusterServer(
            endpoint=self.endpoint,
            data_dir=first.data_dir,
            ca_path=self.ca_path,
            client_id=secrets["client_id"],
            client_secret=secrets["client_secret"],
            token_endpoint=secrets["token_endpoint"],
            stderr_path=first.stderr_path,
            device_endpoint=f"https://127.0.0.1:{self.device_port}",
            process=first.process,
            cluster=self,
        )

    def log_tail(self, max_chars: int = 6000) -> str:
        parts = []
        for node in self.nodes:
            try:
                parts.append(f"--- {node.name} ---\n{node.stderr_path.read_text(errors='replace')[-max_chars:]}")
            except OSError:
                pass
        return "\n".join(parts)

    def close(self) -> None:
        if self.haproxy is not None:
            stop(self.haproxy)
        for node in self.nodes:
            if node.process is not None:
                stop(node.process)
        subprocess.run(
            ["dropdb", "--force", "--if-exists", "-h", "127.0.0.1", "-U", "postgres", self.database], check=False
        )


@dataclass
class ClusterServer(Server):
    cluster: Cluster | None = None
    # One position for all the tests' clients: a test is one actor that hands what it wrote
    # with one client (an identity, a role) to the next, as a provisioning script would.
    positions: FollowPositions = field(default_factory=FollowPositions)

    def client_policies(self) -> list:
        """Each SDK client reads the tests' writes on whichever node answers."""
        return [self.positions]

    def session(self, source_address: str | None = None) -> requests.Session:
        return session_from(source_address, PositionSession(self.positions))

    def metrics(self, token: str | None = None) -> str:
        """Every node's Prometheus text, each asked directly: each counts what it decided."""
        token = token or self.credential().get_token().token
        return "\n".join(metrics_of(node.endpoint, token, self.ca_path) for node in self.cluster.nodes)

    def log_tail(self, max_chars: int = 20000) -> str:
        return self.cluster.log_tail(max_chars // 3)
