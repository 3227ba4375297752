#!/usr/bin/env bash
# The whole test suite: Rust unit and integration tests (cargo-nextest), the API-level ones on
# both store backends (the embedded redb file and PostgreSQL), then the official
# Azure Digital Twins Python SDK against a real server and through a three-node cluster.
# Installs what the tests need (scripts/test-env.sh) on first use.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/test-env.sh
cargo build --locked -p twinguard
if command -v cargo-nextest >/dev/null 2>&1; then
    cargo nextest run --locked --workspace --no-fail-fast
else
    cargo test --locked --workspace --no-fail-fast
fi
# The API-level tests once more with the main store in PostgreSQL (127.0.0.1:5432, a database
# of their own per server, dropped after it), unless TWINGUARD_SKIP_POSTGRES=1.
if [ "${TWINGUARD_SKIP_POSTGRES:-}" != 1 ]; then
    if command -v cargo-nextest >/dev/null 2>&1; then
        TWINGUARD_TEST_STORE=postgresql cargo nextest run --locked -p twinguard-server --test it --no-fail-fast
    else
        TWINGUARD_TEST_STORE=postgresql cargo test --locked -p twinguard-server --test it --no-fail-fast
    fi
fi

if [ -d tests/sdk ]; then
    TWINGUARD_BIN="$PWD/target/debug/twinguard" .venv/bin/pytest -q tests/sdk
    # The official SDK's scenario, the token, identity, telemetry, event, external issuer, TLS
    # and hydra tests once more through a cluster: three nodes on one PostgreSQL database behind
    # HAProxy (tests/sdk/cluster.py), unless TWINGUARD_SKIP_POSTGRES=1. Tests that start
    # servers of their own are left to the pass above (`single_node_only`).
    if [ "${TWINGUARD_SKIP_POSTGRES:-}" != 1 ]; then
        TWINGUARD_TEST_CLUSTER=1 TWINGUARD_BIN="$PWD/target/debug/twinguard" \
            .venv/bin/pytest -q tests/sdk/test_adt_sdk.py tests/sdk/test_tokens.py \
                tests/sdk/test_identity.py tests/sdk/test_workload_identity.py \
                tests/sdk/test_telemetry.py tests/sdk/test_events.py \
                tests/sdk/test_external_issuer.py tests/sdk/test_tls.py tests/sdk/test_hydra.py
    fi
fi
