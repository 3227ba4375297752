#!/usr/bin/env bash
# The whole test suite: Rust unit and integration tests (cargo-nextest), then the official
# Azure Digital Twins Python SDK against a real server. Installs what the Python tests need
# (scripts/test-env.sh) on first use.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --locked -p twinguard
if command -v cargo-nextest >/dev/null 2>&1; then
    cargo nextest run --locked --workspace --no-fail-fast
else
    cargo test --locked --workspace --no-fail-fast
fi

if [ -d tests/sdk ]; then
    bash scripts/test-env.sh
    TWINGUARD_BIN="$PWD/target/debug/twinguard" .venv/bin/pytest -q tests/sdk
fi
