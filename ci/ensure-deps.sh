#!/usr/bin/env bash
# What every target needs: a Rust toolchain, a C toolchain for linking, and /dev/kvm.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
"$here/ensure-packages.sh" build-essential
if ! command -v cargo >/dev/null 2>&1; then
  echo "ensure-deps: no cargo on PATH; install a Rust toolchain (rustup) first" >&2
  exit 1
fi
# make test checks formatting and lints: rustfmt and clippy come with the toolchain's components.
for c in rustfmt clippy; do
  tool=$([ "$c" = rustfmt ] && echo fmt || echo clippy)
  if ! cargo "$tool" --version >/dev/null 2>&1; then
    if command -v rustup >/dev/null 2>&1; then
      echo "ensure-deps: adding the $c component" >&2
      rustup component add "$c" >/dev/null
    else
      echo "ensure-deps: cargo $tool is missing and there is no rustup to add it" >&2
      exit 1
    fi
  fi
done
if [ ! -e /dev/kvm ]; then
  echo "ensure-deps: /dev/kvm is missing: shoal-vmm needs KVM (load kvm_intel or kvm_amd)" >&2
  exit 1
fi
