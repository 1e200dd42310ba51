# Helpers for hardware-test jobs (busybox sh). Prepended to every job.sh.
# run_case NAME CMD...: runs CMD (killed after CASE_TIMEOUT seconds, default 180, exit 143),
# prefixes its output with "[NAME] ", then prints its exit code. A case is run once more, and
# only the second attempt counts, in two cases, both the emulated server's faults rather than
# the VMM's: it was killed by the timeout (QEMU TCG with a nested KVM now and then stalls a
# guest's timer), or it failed and the server's kernel recorded a guest exit at one of its
# own addresses (see outer-init: QEMU's AMD-V emulation ran the guest with the host's state).
# The line "SHOAL-HWTEST-RETRY NAME (why)" and the first attempt's last lines are printed.
# A case that fails any other way is not retried.
emulator_fault() {
  [ -n "${SHOAL_EMULATOR_FAULT_TRACE:-}" ] && grep -m1 kvm_exit "$SHOAL_EMULATOR_FAULT_TRACE" 2>/dev/null
}
run_case() {
  _name=$1; shift
  [ -n "${SHOAL_EMULATOR_FAULT_TRACE:-}" ] && : > "$SHOAL_EMULATOR_FAULT_TRACE"
  timeout "${CASE_TIMEOUT:-180}" "$@" > "/tmp/case-$_name.out" 2>&1
  _code=$?
  _why=
  if [ "$_code" = 143 ]; then
    _why="timed out"
  elif [ "$_code" != 0 ] && _fault=$(emulator_fault); then
    _why="the emulator ran a guest at a host address: $(echo "$_fault" | sed 's/^ *//' | cut -c1-160)"
  fi
  if [ -n "$_why" ]; then
    echo "SHOAL-HWTEST-RETRY $_name ($_why; last lines of the first attempt follow)"
    tail -5 "/tmp/case-$_name.out" | sed "s/^/(first attempt) /"
    [ -n "${SHOAL_EMULATOR_FAULT_TRACE:-}" ] && : > "$SHOAL_EMULATOR_FAULT_TRACE"
    timeout "${CASE_TIMEOUT:-180}" "$@" > "/tmp/case-$_name.out" 2>&1
    _code=$?
  fi
  sed "s/^/[$_name] /" "/tmp/case-$_name.out"
  echo "SHOAL-HWTEST $_name exit=$_code"
}
# load_network_modules: what a node's microVM networking needs (taps, bridges, VXLAN, nf_tables
# with NAT), each module after those it needs. The emulated server's kernel has them as modules
# in /lib/modules; on other hosts they are not there and the kernel loads its own on demand.
load_network_modules() {
  for _m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci failover net_failover \
    virtio_net tun llc stp bridge udp_tunnel ip6_udp_tunnel vxlan nfnetlink libcrc32c nf_defrag_ipv4 \
    nf_defrag_ipv6 nf_conntrack nf_nat nf_tables nft_ct nft_nat nft_masq nft_numgen nft_chain_nat; do
    [ -f "/lib/modules/$_m.ko" ] || continue
    insmod "/lib/modules/$_m.ko" 2>/dev/null || [ -d "/sys/module/$_m" ] || echo "cannot load the module $_m"
  done
}
