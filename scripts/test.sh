#!/usr/bin/env bash
# Install what the tests need (ZooKeeper and Java for the real registry, clang for RocksDB),
# build every binary, run every test: unit tests and the end-to-end tests that start a real
# ZooKeeper and real processes of the PiXiu binaries.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v java >/dev/null 2>&1 || need+=(default-jre-headless)
[ -f /usr/share/java/zookeeper.jar ] || need+=(zookeeper)
command -v clang >/dev/null 2>&1 || need+=(clang)
ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 || need+=(libclang-dev)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
fi

# the end-to-end tests run the binaries, so build them first
cargo build --workspace --bins --locked
cargo test --workspace --locked -- --test-threads=2
