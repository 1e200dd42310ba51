#!/usr/bin/env bash
# Fetches Debian's cloud kernel for the emulated server (unpacked, not installed) and keeps the
# kernel image and the modules the server needs, cached by the package version.
# Usage: fetch-kernel.sh   (prints the cache directory holding vmlinuz and modules/)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${SHOAL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/shoal}
"$here/../../ci/ensure-packages.sh" dpkg-dev >/dev/null
read -r pkg version < <("$here/../../ci/cloud-kernel-package.sh")
# The modules copied; jobs insmod them with each one's dependencies first.
modules="virt/lib/irqbypass.ko arch/x86/kvm/kvm.ko arch/x86/kvm/kvm-amd.ko arch/x86/kvm/kvm-intel.ko \
  drivers/virtio/virtio_ring.ko drivers/virtio/virtio.ko drivers/virtio/virtio_pci_legacy_dev.ko \
  drivers/virtio/virtio_pci_modern_dev.ko drivers/virtio/virtio_pci.ko net/core/failover.ko \
  drivers/net/net_failover.ko drivers/net/virtio_net.ko drivers/block/virtio_blk.ko drivers/net/tun.ko \
  net/bridge/bridge.ko net/802/stp.ko net/llc/llc.ko net/sched/sch_netem.ko \
  net/ipv4/udp_tunnel.ko net/ipv6/ip6_udp_tunnel.ko drivers/net/vxlan/vxlan.ko \
  net/netfilter/nfnetlink.ko lib/libcrc32c.ko net/ipv4/netfilter/nf_defrag_ipv4.ko \
  net/ipv6/netfilter/nf_defrag_ipv6.ko net/netfilter/nf_conntrack.ko net/netfilter/nf_nat.ko \
  net/netfilter/nf_tables.ko net/netfilter/nft_ct.ko net/netfilter/nft_nat.ko \
  net/netfilter/nft_masq.ko net/netfilter/nft_numgen.ko net/netfilter/nft_chain_nat.ko"
# The cache is keyed by the package and by the list of modules taken from it.
dest="$cache/emulated-server/$pkg-$version-$(echo "$modules" | sha256sum | cut -c1-8)"
if [ ! -f "$dest/vmlinuz" ]; then
  work=$(mktemp -d "${TMPDIR:-/tmp}/shoal-cloudk.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  (cd "$work" && apt-get download "$pkg=$version" >/dev/null 2>&1) || { echo "fetch-kernel: cannot download $pkg" >&2; exit 1; }
  dpkg-deb -x "$work"/*.deb "$work/x"
  mkdir -p "$dest.tmp/modules"
  cp "$work"/x/boot/vmlinuz-* "$dest.tmp/vmlinuz"
  for m in $modules; do
    f=$(find "$work"/x/lib/modules -path "*/kernel/$m" | head -n1)
    [ -n "$f" ] && cp "$f" "$dest.tmp/modules/"
  done
  rm -rf "$dest" && mv "$dest.tmp" "$dest"
fi
echo "$dest"
