#!/usr/bin/env bash
# Installs what building and testing extblk needs on Debian 12, skipping what is present.
# Run as root (or with sudo available). Rust itself must be >= 1.85 (rustup.rs): Debian 12's
# packaged rustc is too old for the rust-vmm crates.
set -euo pipefail

pkgs=(build-essential pkg-config e2fsprogs)
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
