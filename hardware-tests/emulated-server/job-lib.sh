# Helpers for hardware-test jobs (busybox sh). Prepended to every job.sh.
# run_case NAME CMD...: runs CMD (killed after CASE_TIMEOUT seconds, default 180, exit 143),
# prefixes its output with "[NAME] ", then prints its exit code.
run_case() {
  _name=$1; shift
  timeout "${CASE_TIMEOUT:-180}" "$@" > "/tmp/case-$_name.out" 2>&1
  _code=$?
  sed "s/^/[$_name] /" "/tmp/case-$_name.out"
  echo "SHOAL-HWTEST $_name exit=$_code"
}
