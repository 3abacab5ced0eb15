#!/usr/bin/env bash
# Installs what building and testing extblk needs on Debian 12, skipping what is present.
# Run as root (or with sudo available). Rust itself must be >= 1.85 (rustup.rs): Debian 12's
# packaged rustc is too old for the rust-vmm crates.
set -euo pipefail

# mount (mount, losetup) and kmod (modprobe): the loop-device tests; binutils (strings):
# scripts/check-release.sh; qemu-utils (qemu-img): the qcow2 test of `extblk convert`.
pkgs=(build-essential pkg-config e2fsprogs mount kmod binutils qemu-utils)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
fi

# The loop-mount and block-device tests (tests/image.rs) need root and loop devices; without
# them they skip, which fails a CI=true run. Load the driver if it is not there yet.
if [ "$(id -u)" -eq 0 ] && [ ! -e /dev/loop-control ]; then
  modprobe loop 2>/dev/null || true
  [ -e /dev/loop-control ] || echo "install-deps: no loop devices (modprobe loop failed): the loop tests will skip, and fail under CI=true" >&2
fi

if ! command -v cargo >/dev/null 2>&1; then
  [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "error: cargo not found; install Rust >= 1.85 with rustup (https://rustup.rs) and re-run" >&2
  exit 1
fi
ver=$(rustc --version | awk '{print $2}')
if [ "$(printf '%s\n1.85.0\n' "$ver" | sort -V | head -n1)" != "1.85.0" ]; then
  echo "error: rustc $ver is too old; extblk needs >= 1.85 (rustup update)" >&2
  exit 1
fi
