#!/usr/bin/env bash
# Fetches the host image's kernel: Debian's generic kernel package (linux-image-amd64: the disk
# and network drivers of real servers, as modules; the cloud kernel the emulated server runs has
# no AHCI or Intel/Mellanox/Broadcom NIC drivers), unpacked, not installed; keeps vmlinuz and the modules modules.txt names with every
# module they need, and writes their modules.dep with depmod. Cached by package version and
# module list.
# Usage: fetch-kernel.sh   (prints the cache directory: vmlinuz, release, lib/modules/<release>/)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${SHOAL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/shoal}
"$here/../../ci/ensure-packages.sh" dpkg-dev kmod >/dev/null
read -r pkg version < <("$here/../../ci/cloud-kernel-package.sh" linux-image-amd64)
wanted=$(grep -v '^#' "$here/modules.txt" | awk 'NF {print $1}')
dest="$cache/host-kernel/$pkg-$version-$( (echo "$wanted"; cat "$0") | sha256sum | cut -c1-8)"
if [ ! -f "$dest/vmlinuz" ]; then
  work=$(mktemp -d "${TMPDIR:-/tmp}/shoal-hostk.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  (cd "$work" && apt-get download "$pkg=$version" >/dev/null 2>&1) || { echo "fetch-kernel: cannot download $pkg" >&2; exit 1; }
  dpkg-deb -x "$work"/*.deb "$work/x"
  release=$(ls "$work/x/lib/modules")
  src="$work/x/lib/modules/$release"
  # The package leaves modules.dep to its postinst: write it for the whole tree first.
  depmod -b "$work/x" "$release"
  out="$dest.tmp/lib/modules/$release"
  rm -rf "$dest.tmp" && mkdir -p "$out"
  cp "$work"/x/boot/vmlinuz-* "$dest.tmp/vmlinuz"
  echo "$release" > "$dest.tmp/release"
  # modules.dep lists each module's dependencies in full (transitively): a module's line gives
  # every file it needs.
  for m in $wanted; do
    line=$(awk -v m="$m" '{ f=$1; sub(":$","",f); n=f; sub(".*/","",n); sub("\\.ko.*$","",n); gsub("-","_",n);
                            if (n==m) { print; exit } }' "$src/modules.dep")
    [ -n "$line" ] || continue   # built in, or not built for this kernel
    for f in $(echo "$line" | tr -d ':'); do
      mkdir -p "$out/$(dirname "$f")"
      cp "$src/$f" "$out/$f"
    done
  done
  cp "$src"/modules.order "$src"/modules.builtin "$src"/modules.builtin.modinfo "$out/" 2>/dev/null || true
  depmod -b "$dest.tmp" "$release"
  rm -rf "$dest" && mv "$dest.tmp" "$dest"
fi
echo "$dest"
