"""slowhttptest, a real slow-client attack tool (Debian's package), in slowloris mode against both
listeners of a server of its own: 40 connections that send their request headers a few bytes every
five seconds and never finish them. The server must close every one of them by itself (its header
read timeout is 10 s) while it keeps serving, so the tool reports "No open connections left" well
before its own 30 s limit. Before issue 17 such connections stayed open past 95 s."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from conftest import _serve

DURATION_S = 30
CONNECTIONS = 40


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory):
    yield from _serve(tmp_path_factory)


def _slowloris(url: str) -> str:
    run = subprocess.run(
        ["slowhttptest", "-H", "-c", str(CONNECTIONS), "-r", str(CONNECTIONS), "-i", "5",
         "-l", str(DURATION_S), "-p", "3", "-u", url],
        capture_output=True, text=True, timeout=DURATION_S + 30, check=False,
    )
    return re.sub(r"\x1b\[[0-9;]*m", "", run.stdout + run.stderr)


@pytest.mark.skipif(shutil.which("slowhttptest") is None, reason="scripts/test-env.sh installs slowhttptest")
def test_slowloris_connections_are_closed_by_the_server_on_both_listeners(slow_server):
    for url in (f"{slow_server.endpoint}/healthz", f"{slow_server.device_endpoint}/healthz"):
        report = _slowloris(url)
        assert "No open connections left" in report, report[-2000:]
        ended = re.search(r"Test ended on (\d+)\w* second", report)
        assert ended and int(ended.group(1)) < DURATION_S, report[-2000:]
        # The tool probes the service all along: it never saw it unavailable.
        assert "service available:   NO" not in report and "service available: NO" not in report
        connected = [int(n) for n in re.findall(r"connected:\s+(\d+)", report)]
        assert connected and max(connected) == CONNECTIONS, report[-2000:]
