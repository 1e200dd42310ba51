#!/usr/bin/env bash
# Prints "PACKAGE VERSION" of the versioned kernel package a Debian kernel metapackage points at
# today: linux-image-cloud-amd64 by default (the emulated server's kernel), or the one named
# (the host image unpacks linux-image-amd64, the generic kernel: real servers' disk and network
# drivers).
# Usage: cloud-kernel-package.sh [METAPACKAGE]
set -euo pipefail
meta=${1:-linux-image-cloud-amd64}
resolve() { apt-cache depends "$meta" 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'; }
pkg=$(resolve)
if [ -z "$pkg" ]; then
  apt-get update -q >/dev/null 2>&1 || true
  pkg=$(resolve)
fi
[ -n "$pkg" ] || { echo "cloud-kernel-package: cannot resolve $meta" >&2; exit 1; }
echo "$pkg $(apt-cache policy "$pkg" | awk '/Candidate:/ {print $2}')"
