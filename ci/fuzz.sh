#!/usr/bin/env bash
# make fuzz: runs every cargo-fuzz target in vmm/fuzz (API request parser and router, virtio
# block, rng, net, vsock and balloon queue processing, the virtio-mmio register window, the MMDS
# endpoint's frame handling, snapshot state
# decoding: whole files, re-sealed payloads and the payload decoder) for RUNS executions each (default
# 1000000) and prints `fuzz_<target>_execs=N seconds=S` per target. A crash stops the script
# with the reproducer under vmm/fuzz/artifacts/. Uses the stable toolchain (RUSTC_BOOTSTRAP
# lets cargo-fuzz pass its sanitizer flags).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
runs=${1:-1000000}
"$here/ensure-packages.sh" build-essential
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi
cd "$here/../vmm/fuzz"
targets=(api_request virtio_block virtio_rng virtio_net virtio_vsock virtio_balloon virtio_mmio mmds_stack snapshot_state)
summary=()
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  log=$(mktemp)
  start=$(date +%s)
  if ! RUSTC_BOOTSTRAP=1 cargo fuzz run --target x86_64-unknown-linux-gnu "$t" "corpus/$t" -- -runs="$runs" -max_len=65600 >"$log" 2>&1; then
    tail -40 "$log"
    echo "fuzz: $t failed (reproducer in vmm/fuzz/artifacts/$t/)" >&2
    exit 1
  fi
  done_line=$(grep -E "^Done [0-9]+ runs" "$log" | tail -1)
  rm -f "$log"
  execs=$(echo "$done_line" | awk '{print $2}')
  summary+=("fuzz_${t}_execs=${execs} seconds=$(( $(date +%s) - start ))")
  echo "fuzz: $t: $done_line"
done
printf '%s\n' "${summary[@]}"
