#!/usr/bin/env bash
# make bench-boot: cold-start figures of shoal-vmm with the boot probe (see ci/bench-boot.py).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
"$here/ensure-packages.sh" python3
exec python3 "$here/bench-boot.py" "$@"
