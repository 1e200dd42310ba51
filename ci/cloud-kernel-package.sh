#!/usr/bin/env bash
# Prints "PACKAGE VERSION" of the versioned kernel package Debian's linux-image-cloud-amd64
# points at today: the kernel the emulated server and the host image both unpack.
set -euo pipefail
resolve() { apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'; }
pkg=$(resolve)
if [ -z "$pkg" ]; then
  apt-get update -q >/dev/null 2>&1 || true
  pkg=$(resolve)
fi
[ -n "$pkg" ] || { echo "cloud-kernel-package: cannot resolve linux-image-cloud-amd64" >&2; exit 1; }
echo "$pkg $(apt-cache policy "$pkg" | awk '/Candidate:/ {print $2}')"
