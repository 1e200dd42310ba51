# Helpers for hardware-test jobs (busybox sh). Prepended to every job.sh.
# run_case NAME CMD...: runs CMD (killed after CASE_TIMEOUT seconds, default 180, exit 143),
# prefixes its output with "[NAME] ", then prints its exit code. A case killed by the timeout
# is run once more (the emulated server, QEMU TCG with a nested KVM, now and then stalls a
# guest's timer); the line "SHOAL-HWTEST-RETRY NAME" and the first attempt's last lines are
# printed, and only the second attempt counts. A case that fails any other way is not retried.
run_case() {
  _name=$1; shift
  timeout "${CASE_TIMEOUT:-180}" "$@" > "/tmp/case-$_name.out" 2>&1
  _code=$?
  if [ "$_code" = 143 ]; then
    echo "SHOAL-HWTEST-RETRY $_name (timed out; last lines of the first attempt follow)"
    tail -5 "/tmp/case-$_name.out" | sed "s/^/(first attempt) /"
    timeout "${CASE_TIMEOUT:-180}" "$@" > "/tmp/case-$_name.out" 2>&1
    _code=$?
  fi
  sed "s/^/[$_name] /" "/tmp/case-$_name.out"
  echo "SHOAL-HWTEST $_name exit=$_code"
}
