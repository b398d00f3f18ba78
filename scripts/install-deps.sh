#!/usr/bin/env bash
# Installs what building and testing Shoal needs on a Debian machine, idempotently: packages
# already present are not touched, and apt is not even consulted when nothing is missing.
set -euo pipefail

# Debian packages the build, the tests and the demo use.
PACKAGES=(
  ca-certificates
  iproute2
  qemu-system-x86     # the VMs (pulls in SeaBIOS and the virtio-net option ROM)
  qemu-utils          # qemu-img: copy-on-write overlays, qcow2 checks
  busybox-static      # the demo template's root filesystem and initramfs
  linux-image-cloud-amd64  # the demo template's kernel and modules
  e2fsprogs           # mkfs.ext4 -d: the demo template's disk without a loop mount
  dosfstools          # mkfs.vfat: NoCloud seeds
  mtools              # mcopy: NoCloud seeds without a mount
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps: missing packages ${missing[*]}; run as root to install them" >&2
    exit 1
  fi
  echo "install-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if ! command -v cargo >/dev/null 2>&1; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    echo "install-deps: cargo is in $HOME/.cargo/bin; add it to PATH" >&2
  else
    echo "install-deps: no Rust toolchain (cargo) found; install it with rustup first" >&2
  fi
  exit 1
fi
