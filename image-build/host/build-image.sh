#!/usr/bin/env bash
# Builds the host image from the release binaries (static) and the cached host kernel:
#   OUT/vmlinuz, OUT/initramfs.img, OUT/shoal.ipxe   PXE boot (the script fetches the other two)
#   OUT/shoal.efi                                    the unified kernel image (stub + kernel + initramfs + command line)
#   OUT/shoal.raw                                    a GPT disk to flash: ESP (systemd-boot + the UKI) and a blank data partition
# Same inputs, same bytes (the raw disk aside: mtools still stamps two FAT directory entries with
# the build's time): files sorted, owners and times fixed, GUIDs and the FAT serial derived from
# the inputs. No root and no loop mounts (mtools and sgdisk write the disk image).
# Usage: build-image.sh BIN_DIR OUT_DIR   ($SHOAL_IMAGE_CMDLINE is appended to the kernel command line)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin=${1:?directory of shoal-node, shoal-vmm, shoalctl}; out=${2:?output directory}
"$here/../../ci/ensure-packages.sh" cpio gzip e2fsprogs systemd-boot-efi binutils mtools dosfstools gdisk >/dev/null
kdir=$("$here/fetch-kernel.sh")
release=$(cat "$kdir/release")
cmdline="console=tty0 console=ttyS0,115200 panic=-1 quiet ${SHOAL_IMAGE_CMDLINE:-}"
cmdline=$(echo "$cmdline" | xargs)
# A fixed time for every file (FAT cannot hold times before 1980).
epoch=${SOURCE_DATE_EPOCH:-1767225600}
mkdir -p "$out"
work=$(mktemp -d "${TMPDIR:-/tmp}/shoal-image.XXXXXX")
trap 'rm -rf "$work"' EXIT

# --- initramfs ---------------------------------------------------------------------------
root="$work/root"
mkdir -p "$root"/{bin,sbin,etc,dev,proc,sys,run,tmp,var/lib/shoal,lib/modules}
for b in shoal-node shoal-vmm shoalctl; do
  [ -x "$bin/$b" ] || { echo "build-image: $bin/$b is missing (cargo build --release)" >&2; exit 1; }
  install -m 0755 "$bin/$b" "$root/bin/$b"
done
ln -s bin/shoal-node "$root/init"
cp -a "$kdir/lib/modules/$release" "$root/lib/modules/"
# mke2fs formats the data disk on first boot: the only dynamically linked program, with the
# libraries ldd names.
install -m 0755 /sbin/mke2fs "$root/sbin/mke2fs"
for lib in $(ldd /sbin/mke2fs | awk '/=> \// {print $3} /^\t\/lib/ {print $1}'); do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
cp /etc/mke2fs.conf "$root/etc/mke2fs.conf"
version=$(grep -m1 '^version' "$here/../../Cargo.toml" | cut -d'"' -f2)
cat > "$root/etc/os-release" <<OSR
NAME="Shoal"
ID=shoal
PRETTY_NAME="Shoal $version"
VERSION_ID=$version
OSR
echo "root:x:0:0:root:/:/bin/shoal-node" > "$root/etc/passwd"
find "$root" -exec touch -h -d "@$epoch" {} +
(cd "$root" && find . | LC_ALL=C sort | cpio --quiet --reproducible -o -H newc --owner 0:0) | gzip -n -9 > "$work/initramfs.img"
cp "$kdir/vmlinuz" "$work/vmlinuz"

# --- PXE ---------------------------------------------------------------------------------
# initrd= on the kernel line is what OVMF's iPXE needs; the kernel ignores it (and the image
# name iPXE puts first).
cat > "$work/shoal.ipxe" <<IPXE
#!ipxe
kernel vmlinuz initrd=initramfs.img $cmdline
initrd initramfs.img
boot
IPXE

# --- unified kernel image ----------------------------------------------------------------
stub=/usr/lib/systemd/boot/efi/linuxx64.efi.stub
echo -n "$cmdline" > "$work/cmdline.txt"
objcopy \
  --add-section .osrel="$root/etc/os-release" --change-section-vma .osrel=0x20000 \
  --add-section .cmdline="$work/cmdline.txt" --change-section-vma .cmdline=0x30000 \
  --add-section .linux="$work/vmlinuz" --change-section-vma .linux=0x2000000 \
  --add-section .initrd="$work/initramfs.img" --change-section-vma .initrd=0x3000000 \
  "$stub" "$work/shoal.efi"
# objcopy stamps the PE header with the time of the build: put the fixed time there instead
# (COFF TimeDateStamp, 8 bytes into the header that the u32 at 0x3c points to; firmware does
# not check the PE checksum, which is zeroed: it covered the old time).
pe=$(od -An -t u4 -j 60 -N 4 "$work/shoal.efi" | tr -d ' ')
printf "$(printf '\\x%02x\\x%02x\\x%02x\\x%02x' $((epoch & 255)) $((epoch >> 8 & 255)) $((epoch >> 16 & 255)) $((epoch >> 24 & 255)))" |
  dd of="$work/shoal.efi" bs=1 seek=$((pe + 8)) conv=notrunc status=none
printf '\x00\x00\x00\x00' | dd of="$work/shoal.efi" bs=1 seek=$((pe + 88)) conv=notrunc status=none

# --- raw GPT disk ------------------------------------------------------------------------
# ESP: 256 MiB, room for two UKIs (A/B); the data partition: 1 GiB of zeros (sparse), which
# the node formats on its first boot.
esp_mib=256; data_mib=1024
seed=$(cat "$work/shoal.efi" | sha256sum | cut -c1-32)
guid() { echo "$seed$1" | sha256sum | sed -E 's/^(.{8})(.{4})(.{4})(.{4})(.{12}).*/\1-\2-\3-\4-\5/'; }
esp="$work/esp.img"
mkfs.vfat -C -F 32 -n SHOAL-ESP -i "${seed:0:8}" "$esp" $((esp_mib * 1024)) >/dev/null
cat > "$work/loader.conf" <<LOADER
timeout 0
default shoal-*
LOADER
touch -d "@$epoch" "$work/shoal.efi" "$work/loader.conf"
export MTOOLS_SKIP_CHECK=1 SOURCE_DATE_EPOCH=$epoch
mmd -i "$esp" ::/EFI ::/EFI/BOOT ::/EFI/Linux ::/loader
mcopy -m -i "$esp" /usr/lib/systemd/boot/efi/systemd-bootx64.efi ::/EFI/BOOT/BOOTX64.EFI
mcopy -m -i "$esp" "$work/loader.conf" ::/loader/loader.conf
# Boot counting (systemd-boot): three tries; the node blesses the entry (drops the +3) once it
# has booted well, and an entry out of tries sorts after a B image's.
mcopy -m -i "$esp" "$work/shoal.efi" ::/EFI/Linux/shoal-a+3.efi
disk="$work/shoal.raw"
truncate -s $(( (1 + esp_mib + data_mib + 1) << 20 )) "$disk"
# (No -q: with it this sgdisk writes nothing.)
sgdisk -U "$(guid disk)" \
  -n 1:2048:+${esp_mib}M -t 1:ef00 -c 1:"EFI System" -u 1:"$(guid esp)" \
  -n 2:0:0 -t 2:8300 -c 2:shoal-data -u 2:"$(guid data)" "$disk" >/dev/null
dd if="$esp" of="$disk" bs=1M seek=1 conv=notrunc,sparse status=none

for f in vmlinuz initramfs.img shoal.ipxe shoal.efi shoal.raw; do
  cp --sparse=always "$work/$f" "$out/$f.tmp" && mv "$out/$f.tmp" "$out/$f"
done
k=$(stat -c %s "$out/vmlinuz"); i=$(stat -c %s "$out/initramfs.img")
echo "image_kernel_bytes=$k image_initramfs_bytes=$i image_total_bytes=$((k + i)) image_dir=$out"
