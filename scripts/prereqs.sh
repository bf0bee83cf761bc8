#!/usr/bin/env bash
# What PiXiu needs from the system, checked by exactly what uses it, and installed when missing.
#
#   scripts/prereqs.sh [--check] [--root DIR] build|test|bench
#
#   build  what `cargo build` needs: a C++ compiler and clang for RocksDB, and libclang.so
#          where the clang-sys crate (used by bindgen) looks for it.
#   test   build, plus what the tests start: java and ZooKeeper (the real registry), chromium
#          (the demo page test), systemd-analyze (unit files), kubernetes-validate (manifests).
#   bench  test, plus the peer the benchmarks measure against (nats-server) and perf.
#
#   --check     report only: print the missing packages, one a line, and exit 1 if any.
#   --root DIR  look under DIR instead of / (the script's own test uses a fake root).
#
# Installs Debian packages with apt-get (with sudo when not root) and the manifest validator
# with pip. Both commands of the README call this first.
set -euo pipefail

check_only=0
root=""
want=""
while [ $# -gt 0 ]; do
  case "$1" in
    --check) check_only=1 ;;
    --root) root="${2:?--root needs a directory}"; shift ;;
    build|test|bench) want="$1" ;;
    *) echo "prereqs.sh: unknown argument '$1' (usage: prereqs.sh [--check] [--root DIR] build|test|bench)" >&2; exit 2 ;;
  esac
  shift
done
[ -n "$want" ] || { echo "prereqs.sh: say what for: build, test or bench" >&2; exit 2; }

# An executable, on PATH for the real root, under the usual bin folders for a fake one.
have_cmd() {
  if [ -z "$root" ]; then
    command -v "$1" >/dev/null 2>&1
  else
    local d
    for d in /usr/bin /usr/local/bin /bin /usr/sbin; do
      [ -x "$root$d/$1" ] && return 0
    done
    return 1
  fi
}

# libclang as clang-sys finds it: a file named libclang.so or libclang-<version>.so (not
# libclang-cpp, not only a versioned libclang.so.N, which the linker cannot use) in
# $LIBCLANG_PATH when set, else in the folders clang-sys searches.
have_libclang() {
  local dirs=() d f
  if [ -z "$root" ] && [ -n "${LIBCLANG_PATH:-}" ]; then
    dirs=("$LIBCLANG_PATH")
  else
    if [ -z "$root" ] && command -v llvm-config >/dev/null 2>&1; then
      dirs+=("$(llvm-config --libdir)")
    fi
    for d in "$root"/usr/lib/llvm-*/lib "$root"/usr/lib/*-linux-gnu "$root"/usr/lib \
             "$root"/usr/lib64 "$root"/usr/local/lib "$root"/usr/local/llvm*/lib; do
      [ -d "$d" ] && dirs+=("$d")
    done
  fi
  for d in "${dirs[@]}"; do
    for f in "$d"/libclang.so "$d"/libclang-[0-9]*.so; do
      [ -e "$f" ] && return 0
    done
  done
  return 1
}

have_py_module() {
  [ -z "$root" ] || return 0 # a fake root has no Python of its own; nothing to check there
  python3 -c "import $1" >/dev/null 2>&1
}

apt=()
pip=()
have_cmd c++ || apt+=(g++)
have_cmd clang || apt+=(clang)
have_libclang || apt+=(libclang-dev)
if [ "$want" = test ] || [ "$want" = bench ]; then
  have_cmd java || apt+=(default-jre-headless)
  [ -f "$root/usr/share/java/zookeeper.jar" ] || apt+=(zookeeper)
  have_cmd chromium || apt+=(chromium)
  have_cmd systemd-analyze || apt+=(systemd)
  if have_cmd python3; then
    have_py_module pip || apt+=(python3-pip)
  else
    apt+=(python3 python3-pip)
  fi
  have_py_module kubernetes_validate || pip+=(kubernetes-validate)
fi
if [ "$want" = bench ]; then
  # Debian puts it in /usr/sbin, which a non-root PATH may lack
  have_cmd nats-server || [ -x "$root/usr/sbin/nats-server" ] || apt+=(nats-server)
  have_cmd perf || apt+=(linux-perf)
fi

if [ $check_only -eq 1 ]; then
  for p in "${apt[@]}" "${pip[@]}"; do echo "$p"; done
  [ $(( ${#apt[@]} + ${#pip[@]} )) -eq 0 ]
  exit
fi
[ -z "$root" ] || { echo "prereqs.sh: --root is for --check only" >&2; exit 2; }

if [ ${#apt[@]} -gt 0 ]; then
  echo "prereqs: installing ${apt[*]} (apt-get)" >&2
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${apt[@]}" >&2
fi
if [ ${#pip[@]} -gt 0 ]; then
  echo "prereqs: installing ${pip[*]} (pip)" >&2
  # a Debian python refuses installs outside a venv (PEP 668) unless told otherwise
  python3 -m pip install -q "${pip[@]}" >&2 ||
    python3 -m pip install -q --break-system-packages "${pip[@]}" >&2
fi
# Check again: an install that "worked" but left the thing missing must not pass.
if ! missing=$("$0" --check "$want"); then
  echo "prereqs: still missing after the install: $(echo $missing)" >&2
  exit 1
fi
