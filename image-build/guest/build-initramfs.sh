#!/usr/bin/env bash
# Builds the microVM guest initramfs (static busybox + /init + the vsock agent), cached outside
# the checkout and keyed by the init scripts, the agent's source, this recipe's version, the
# busybox-static package version and the C compiler's.
# Usage: build-initramfs.sh OUT_DIR   (leaves OUT_DIR/initramfs.cpio.gz and OUT_DIR/initramfs.cpio,
# links into the cache). The uncompressed one boots faster where guest code is slow (gunzip of
# the 1 MB archive took the guest 5 s in the emulated server).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: build-initramfs.sh OUT_DIR}
mkdir -p "$out" && out=$(cd "$out" && pwd)
cache=${SHOAL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/shoal}

"$here/../../ci/ensure-packages.sh" busybox-static cpio gzip e2fsprogs build-essential

RECIPE=3
bb_version=$(dpkg-query -W -f='${Version}' busybox-static)
cc_version=$(cc --version | head -n 1)
key=$(cat "$here/init" "$here/poweroff" "$here/vsock-agent.c" <(echo "recipe=$RECIPE busybox=$bb_version cc=$cc_version") | sha256sum | cut -c1-16)
dest="$cache/guest-initramfs/$key"
if [ ! -f "$dest/initramfs.cpio.gz" ] || [ ! -f "$dest/initramfs.cpio" ] || [ ! -f "$dest/rootfs.ext4" ]; then
  work=$(mktemp -d "${TMPDIR:-/tmp}/shoal-initramfs.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  root="$work/root"
  mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,etc,root}
  cp /bin/busybox "$root/bin/busybox"
  for applet in $(/bin/busybox --list-full); do
    [ -e "$root/$applet" ] || ln -s /bin/busybox "$root/$applet"
  done
  for cmd in poweroff halt; do
    rm -f "$root/sbin/$cmd"
    install -m 0755 "$here/poweroff" "$root/sbin/$cmd"
  done
  install -m 0755 "$here/init" "$root/init"
  cc -static -Os -Wall -Werror -o "$root/bin/vsock-agent" "$here/vsock-agent.c"
  echo 'root:x:0:0:root:/root:/bin/sh' > "$root/etc/passwd"
  echo 'PS1="# "' > "$root/etc/profile"
  mkdir -p "$dest.tmp"
  (cd "$root" && find . | LC_ALL=C sort | cpio --quiet -o -H newc --owner 0:0) > "$dest.tmp/initramfs.cpio"
  gzip -9 -n -c "$dest.tmp/initramfs.cpio" > "$dest.tmp/initramfs.cpio.gz"
  # The same tree as an ext4 root disk image for virtio-blk (root=/dev/vda init=/init).
  mkfs.ext4 -q -F -L shoal-root -E root_owner=0:0 -d "$root" "$dest.tmp/rootfs.ext4" 32M
  rm -rf "$dest" && mv "$dest.tmp" "$dest"
fi
ln -sfn "$dest/initramfs.cpio.gz" "$out/initramfs.cpio.gz"
ln -sfn "$dest/initramfs.cpio" "$out/initramfs.cpio"
ln -sfn "$dest/rootfs.ext4" "$out/rootfs.ext4"
echo "guest-initramfs: $out/initramfs.cpio.gz $out/initramfs.cpio $out/rootfs.ext4 (cache $dest)" >&2
