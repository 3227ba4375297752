#!/usr/bin/env bash
# Sets up what the end-to-end tests need: a virtualenv at <repo>/.venv with the pinned packages
# of tests/sdk/requirements.txt, and THC hydra, slowhttptest, rsyslog, iproute2, HAProxy and
# Mosquitto from Debian. Idempotent, and a fast no-op when all are there (a stamp holds the hash
# of the requirements the venv was built from).
# Works on a fresh Debian machine as root: installs python3-venv if the venv module is missing.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
requirements="$root/tests/sdk/requirements.txt"
venv="$root/.venv"
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$requirements" | cut -d' ' -f1)"

apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "$@" >/dev/null
}

# Attack tools the tests run against the server on loopback.
if ! command -v hydra >/dev/null 2>&1; then
    apt_install hydra
fi
if ! command -v slowhttptest >/dev/null 2>&1; then
    apt_install slowhttptest
fi
# A real syslog collector (with its TLS driver) receives the SIEM export in the tests.
if ! command -v rsyslogd >/dev/null 2>&1 || ! dpkg -s rsyslog-gnutls >/dev/null 2>&1; then
    apt_install rsyslog rsyslog-gnutls
fi

# iproute2: the partition test puts a PostgreSQL of its own in a network namespace
# (crates/cli/tests/it/partition.rs).
if ! command -v ip >/dev/null 2>&1; then
    apt_install iproute2
fi

# HAProxy: the cluster test puts three nodes behind it (tests/sdk/test_cluster.py).
if ! command -v haproxy >/dev/null 2>&1; then
    apt_install haproxy
fi

# Mosquitto: the tests start a TLS broker of their own beside the machine's plain one.
if ! command -v mosquitto >/dev/null 2>&1; then
    apt_install mosquitto
fi

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] && "$venv/bin/python" -c '' 2>/dev/null; then
    exit 0
fi

if ! command -v python3 >/dev/null 2>&1; then
    apt_install python3 python3-venv
fi
# Debian ships venv's ensurepip in a separate package.
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    apt_install python3-venv
fi

# A virtualenv whose interpreter no longer runs (moved repo, upgraded python) is rebuilt.
if [[ -d "$venv" ]] && ! "$venv/bin/python" -c '' >/dev/null 2>&1; then
    rm -rf "$venv"
fi
if [[ ! -x "$venv/bin/python" ]]; then
    python3 -m venv "$venv"
fi

"$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$requirements"
echo "$want" >"$stamp"
echo "test-env: $venv ready"
