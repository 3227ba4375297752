"""THC hydra, a real password-guessing tool, against the login (password grant) on loopback.
The run is bounded (a 300-word list, 4 tasks, at most 90 seconds). It must not find the
password, even though the right one is in its list: after a handful of failures the address backs
off and every further guess is answered 429 without being checked. Meanwhile the account's owner,
from another address, logs in at once. The figures go to target/hydra-report.md (through a
cluster, target/hydra-report-cluster.md: the backoff is shared by the nodes, so guesses spread
over three nodes by the balancer back off as they do on one)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests

from conftest import HTTP_TIMEOUT_S, REPO_ROOT, FromAddress, serve_shared

USER = "plant-operator"
PASSWORD = "the right passphrase 42"
WORDS = 300
HYDRA_TIMEOUT_S = 90


@pytest.fixture(scope="module")
def hydra_server(tmp_path_factory):
    yield from serve_shared(tmp_path_factory)


def test_hydra_finds_nothing_backoff_engages_and_the_owner_still_logs_in(hydra_server, tmp_path):
    hydra = shutil.which("hydra")
    assert hydra, "hydra is installed by scripts/test-env.sh"
    server = hydra_server
    token = server.credential().get_token("https://digitaltwins.azure.net/.default").token
    created = server.session().post(
        f"{server.endpoint}/admin/identities",
        json={"kind": "user", "name": USER, "password": PASSWORD},
        headers={"Authorization": f"Bearer {token}"},
        verify=server.ca_path,
        timeout=HTTP_TIMEOUT_S,
    )
    assert created.status_code == 201, created.text

    words = tmp_path / "words.txt"
    guesses = [f"guess-{i:04d}-password" for i in range(WORDS - 1)] + [PASSWORD]
    words.write_text("\n".join(guesses) + "\n")
    port = server.endpoint.rsplit(":", 1)[1]
    started = time.monotonic()
    result = subprocess.run(
        [
            hydra, "-l", USER, "-P", str(words), "-t", "4", "-I", "-f", "-s", port, "127.0.0.1",
            "https-post-form",
            "/oauth2/token:grant_type=password&username=^USER^&password=^PASS^:S=access_token",
        ],
        capture_output=True,
        text=True,
        timeout=HYDRA_TIMEOUT_S + 30,
    )
    elapsed = time.monotonic() - started
    output = result.stdout + result.stderr
    assert "0 valid password" in output or "valid password found" not in output, output[-3000:]
    assert PASSWORD not in output, "hydra found the password"

    log = server.log_tail(max_chars=1 << 30)
    checked = log.count('"login failed"')
    throttled = log.count("backing off after failed attempts")
    assert throttled > 0, "backoff never engaged"
    assert checked < WORDS // 4, f"{checked} guesses were checked; backoff should stop most"

    # The right password from the attacking address is refused while it backs off...
    r = requests.post(server.token_endpoint, data={"grant_type": "password", "username": USER,
                      "password": PASSWORD}, verify=server.ca_path, timeout=HTTP_TIMEOUT_S)
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
    # ...while the owner, from another address, logs in at once.
    owner = requests.Session()
    owner.mount("https://", FromAddress("127.0.0.2"))
    r = owner.post(server.token_endpoint, data={"grant_type": "password", "username": USER,
                   "password": PASSWORD}, verify=server.ca_path, timeout=HTTP_TIMEOUT_S)
    assert r.status_code == 200, r.text

    # Every failure and every throttled attempt is counted in the metrics.
    # (Through a cluster, summed over the nodes: each counts what it decided.) With the token
    # taken before the attack: this address is backing off, a token request from it included.
    scrape = server.metrics(token)
    counted: dict[str, int] = {}
    for key, value in re.findall(r'^(twinguard_auth_\w+(?:\{[^}]*\})?) (\d+)', scrape, re.M):
        counted[key] = counted.get(key, 0) + int(value)
    assert counted.get('twinguard_auth_failures_total{method="password"}', 0) >= checked, scrape
    assert counted.get("twinguard_auth_throttled_total", 0) >= throttled, scrape

    rate = re.findall(r"\[STATUS\] ([0-9.]+) tries/min", output)
    cluster = os.environ.get("TWINGUARD_TEST_CLUSTER") == "1"
    report = REPO_ROOT / "target" / ("hydra-report-cluster.md" if cluster else "hydra-report.md")
    report.parent.mkdir(exist_ok=True)
    report.write_text(
        "# hydra against the login endpoint" + (" of three nodes behind HAProxy" if cluster else "") + "\n\n"
        f"- words tried: {WORDS} (the right password last), 4 tasks, loopback\n"
        f"- hydra ran {elapsed:.1f} s, {WORDS / elapsed * 60:.0f} attempts/min sent"
        + (f" (hydra's own status: {rate[-1]} tries/min)" if rate else "") + "\n"
        f"- guesses the server checked: {checked}; answered 429 without checking: {throttled}\n"
        "- password found: no; owner from 127.0.0.2 logged in at once: yes\n"
    )
