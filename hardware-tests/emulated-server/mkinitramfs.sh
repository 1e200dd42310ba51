#!/usr/bin/env bash
# Packs the emulated server's initramfs: static busybox, the KVM modules, /init, and a payload
# directory (shoal-vmm, guest kernels, job.sh) under /shoal.
# Usage: mkinitramfs.sh KERNEL_CACHE_DIR PAYLOAD_DIR OUT.cpio.gz
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
kdir=${1:?kernel cache dir}; payload=${2:?payload dir}; out=${3:?output}
"$here/../../ci/ensure-packages.sh" busybox-static cpio gzip
work=$(mktemp -d "${TMPDIR:-/tmp}/shoal-srvinit.XXXXXX")
trap 'rm -rf "$work"' EXIT
root="$work/root"
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,lib/modules,shoal}
cp /bin/busybox "$root/bin/busybox"
for applet in $(/bin/busybox --list-full); do
  [ -e "$root/$applet" ] || ln -s /bin/busybox "$root/$applet"
done
cp "$kdir"/modules/*.ko "$root/lib/modules/"
install -m 0755 "$here/outer-init" "$root/init"
cp -rL "$payload"/. "$root/shoal/"
(cd "$root" && find . | LC_ALL=C sort | cpio --quiet -o -H newc --owner 0:0 | gzip -1) > "$out"
