"""SIEM export to a real syslog receiver: rsyslog from Debian, started here on a free port with
TLS (gtls driver, certificate from a test CA). twinguard forwards every audit entry as an
RFC 5424 message with a CEF body over RFC 5425 framing, and also as JSON lines to a file. The
receiver is then stopped while requests go on, and started again: nothing is lost."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid

import pytest
import requests

from conftest import HTTP_TIMEOUT_S, _serve, free_port, make_test_ca

WAIT_S = 30


class Rsyslog:
    def __init__(self, directory, port: int):
        self.directory = directory
        self.port = port
        self.received = directory / "received.log"
        conf = directory / "rsyslog.conf"
        conf.write_text(f"""
global(workDirectory="{directory}"
       DefaultNetstreamDriver="gtls"
       DefaultNetstreamDriverCAFile="{directory}/ca.pem"
       DefaultNetstreamDriverCertFile="{directory}/cert.pem"
       DefaultNetstreamDriverKeyFile="{directory}/key.pem")
module(load="imtcp" StreamDriver.Name="gtls" StreamDriver.Mode="1" StreamDriver.AuthMode="anon")
input(type="imtcp" port="{port}")
template(name="raw" type="string" string="%app-name% %msg%\\n")
action(type="omfile" file="{self.received}" template="raw")
""")
        self.conf = conf
        self.process = None

    def start(self):
        self.process = subprocess.Popen(
            ["rsyslogd", "-n", "-f", str(self.conf), "-i", str(self.directory / "rsyslogd.pid")],
            stdout=subprocess.DEVNULL, stderr=open(self.directory / "rsyslogd.err", "ab"),
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError("rsyslogd did not listen: " + (self.directory / "rsyslogd.err").read_text())

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=10)

    def text(self) -> str:
        return self.received.read_text(errors="replace") if self.received.exists() else ""


@pytest.fixture(scope="module")
def collector(tmp_path_factory):
    assert shutil.which("rsyslogd"), "rsyslog is installed by scripts/test-env.sh"
    directory = tmp_path_factory.mktemp("rsyslog")
    make_test_ca(directory)
    receiver = Rsyslog(directory, free_port())
    receiver.start()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="module")
def siem_server(tmp_path_factory, collector):
    jsonl = collector.directory / "audit.jsonl"
    yield from _serve(tmp_path_factory, (
        "--siem-syslog", f"127.0.0.1:{collector.port}", "--siem-ca", str(collector.directory / "ca.pem"),
        "--siem-server-name", "localhost", "--siem-format", "cef", "--siem-file", str(jsonl),
    ))


def _requests(server, n: int) -> list[str]:
    token = server.credential().get_token("https://digitaltwins.azure.net/.default").token
    ids = []
    for _ in range(n):
        r = requests.get(f"{server.endpoint}/models?api-version=2023-10-31",
                         headers={"Authorization": f"Bearer {token}", "x-test": uuid.uuid4().hex},
                         verify=server.ca_path, timeout=HTTP_TIMEOUT_S)
        assert r.status_code == 200
        ids.append(r.headers["x-ms-request-id"])
    return ids


def _wait_for(collector, ids, what):
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        text = collector.text()
        missing = [i for i in ids if f"cs1={i}" not in text]
        if not missing:
            return text
        time.sleep(0.2)
    raise AssertionError(f"{len(missing)} of {len(ids)} {what} never reached the collector")


def test_audit_entries_reach_rsyslog_over_tls_as_cef(siem_server, collector):
    ids = _requests(siem_server, 10)
    text = _wait_for(collector, ids, "entries")
    line = next(l for l in text.splitlines() if f"cs1={ids[0]}" in l)
    assert line.startswith("twinguard CEF:0|twinguard|twinguard|"), line
    assert "requestMethod=GET" in line and "request=/models" in line and "outcome=ok" in line
    # The JSON-lines file sink has them too, as the log recorded them. It forwards on a cursor
    # of its own, so it may write them a moment after the syslog sink sent them.
    jsonl = collector.directory / "audit.jsonl"
    deadline = time.monotonic() + WAIT_S
    while True:
        text = jsonl.read_text() if jsonl.exists() else ""
        missing = [i for i in ids if f'"correlationId":"{i}"' not in text]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not missing, f"{len(missing)} of {len(ids)} entries never reached the JSON-lines file"


def test_a_stalled_receiver_loses_nothing_after_it_recovers(siem_server, collector):
    _wait_for(collector, _requests(siem_server, 3), "entries before the outage")
    collector.stop()
    during = _requests(siem_server, 25)
    time.sleep(1.5)  # the forwarder meets the dead receiver and keeps the entries
    collector.start()
    _wait_for(collector, during, "entries sent during the outage")
