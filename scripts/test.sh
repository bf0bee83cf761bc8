#!/usr/bin/env bash
# The test command: install what the tests need (scripts/prereqs.sh), check formatting and
# lints, build every binary, run every test: unit tests and the end-to-end tests that start a
# real ZooKeeper, real processes of the PiXiu binaries and a headless Chromium.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/prereqs.sh test

# the lint gate: unformatted code or any clippy warning fails the run
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

# the end-to-end tests run the binaries, so build them first
cargo build --workspace --bins --locked
cargo test --workspace --locked -- --test-threads=2
