#!/usr/bin/env bash
# Runs a test command, passes its output through, and ends with one line totalling every
# "test result:" line cargo printed (cargo's own last line is that of its last test binary,
# often a doc-test run with 0 tests). Exits with the command's status.
set -uo pipefail
log=$(mktemp)
"$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
passed=$(grep -oE 'test result: [a-zA-Z]+\. [0-9]+ passed' "$log" | awk '{s+=$4} END {print s+0}')
failed=$(grep -oE '; [0-9]+ failed' "$log" | awk '{s+=$2} END {print s+0}')
rm -f "$log"
echo "tests: $passed passed, $failed failed"
exit "$status"
