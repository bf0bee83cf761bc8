#!/usr/bin/env bash
# The run command: install what the build needs (scripts/prereqs.sh), build the release
# binaries, and start one of every role in one process (`pixiu-ctl standalone`). Any
# arguments go to `pixiu-ctl standalone` (see `--help`).
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/prereqs.sh build
cargo build --release --locked -p pixiu-tools --bin pixiu-ctl
exec "${CARGO_TARGET_DIR:-target}/release/pixiu-ctl" standalone "$@"
