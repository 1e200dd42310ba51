#!/usr/bin/env bash
# Builds the microVM guest kernel (vmlinux and bzImage) from Debian's linux-source-6.1 with
# the project's config fragment, cached outside the checkout and keyed by every input:
# the fragment, the build recipe version below and the exact source package version.
# Usage: build-kernel.sh OUT_DIR   (leaves OUT_DIR/vmlinux and OUT_DIR/bzImage as links into the cache)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: build-kernel.sh OUT_DIR}
mkdir -p "$out" && out=$(cd "$out" && pwd)
cache=${SHOAL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/shoal}

"$here/../../ci/ensure-packages.sh" linux-source-6.1 build-essential bc flex bison libelf-dev libssl-dev xz-utils

# Bump when the build steps below change what they produce.
RECIPE=1
src_version=$(dpkg-query -W -f='${Version}' linux-source-6.1)
key=$(cat "$here/kernel.config" <(echo "recipe=$RECIPE source=$src_version") | sha256sum | cut -c1-16)
dest="$cache/guest-kernel/$key"
if [ ! -f "$dest/vmlinux" ] || [ ! -f "$dest/bzImage" ]; then
  echo "guest-kernel: building linux-source $src_version (key $key); this takes several minutes once" >&2
  work=$(mktemp -d "${TMPDIR:-/tmp}/shoal-kbuild.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  tar -C "$work" -xf /usr/src/linux-source-6.1.tar.xz
  cd "$work"/linux-source-6.1
  make -s ARCH=x86_64 tinyconfig
  ./scripts/kconfig/merge_config.sh -m -O . .config "$here/kernel.config" >/dev/null
  make -s ARCH=x86_64 olddefconfig
  # Every option we ask for must survive olddefconfig: a silently dropped option is a broken guest.
  missing=0
  while IFS= read -r line; do
    case "$line" in CONFIG_*=y) grep -qx "$line" .config || { echo "guest-kernel: $line did not stick" >&2; missing=1; } ;; esac
  done < "$here/kernel.config"
  [ "$missing" = 0 ] || exit 1
  make -s ARCH=x86_64 -j"$(nproc)" vmlinux bzImage
  mkdir -p "$dest.tmp"
  cp vmlinux "$dest.tmp/vmlinux"
  cp arch/x86/boot/bzImage "$dest.tmp/bzImage"
  cp .config "$dest.tmp/config"
  rm -rf "$dest" && mv "$dest.tmp" "$dest"
fi
mkdir -p "$out"
ln -sfn "$dest/vmlinux" "$out/vmlinux"
ln -sfn "$dest/bzImage" "$out/bzImage"
echo "guest-kernel: $out/vmlinux $out/bzImage (cache $dest)" >&2
