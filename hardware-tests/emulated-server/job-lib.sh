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
