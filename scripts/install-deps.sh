#!/usr/bin/env bash
# Installs what building and testing Shoal needs on a Debian machine, idempotently: packages
# already present are not touched, and apt is not even consulted when nothing is missing.
set -euo pipefail

# Debian packages the build, the tests and the demo use.
PACKAGES=(
  ca-certificates
  iproute2
  nftables            # nft: the network tests read the NAT gateway's rules (Shoal writes them over netlink)
  qemu-system-x86     # the VMs (pulls in SeaBIOS and the virtio-net option ROM)
  qemu-utils          # qemu-img: copy-on-write overlays, qcow2 checks
  busybox-static      # the demo template's root filesystem and initramfs
  linux-image-cloud-amd64  # the demo template's kernel and modules
  e2fsprogs           # mkfs.ext4 -d: the demo template's disk without a loop mount
  dosfstools          # mkfs.vfat: NoCloud seeds
  mtools              # mcopy: NoCloud seeds without a mount
  debootstrap         # shoal template build-debian: a Debian root filesystem from the mirror
  openssh-client      # ssh, ssh-keygen: logging into real Debian guests (tests, make demo-debian)
  # scripts/cloud-init/: the distributions' cloud-init, unpacked (never installed), run by the
  # host's /usr/bin/python3 to check NoCloud seeds; these are the modules those versions import.
  curl xz-utils
  python3 python3-yaml python3-jinja2 python3-jsonschema python3-jsonpatch python3-configobj
  python3-requests python3-oauthlib python3-netifaces python3-serial
)

missing_packages() {
  missing=()
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
}

# Two passes: installing one package can make apt remove another that conflicts with it (seen:
# qemu-system-x86 from bookworm removed a newer qemu-utils from backports, and with it qemu-img).
# The second pass puts back what the first took away, at versions that fit together.
for pass in 1 2; do
  missing_packages
  ((${#missing[@]})) || break
  if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps: missing packages ${missing[*]}; run as root to install them" >&2
    exit 1
  fi
  echo "install-deps: installing ${missing[*]} (pass $pass)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
done
missing_packages
if ((${#missing[@]})); then
  echo "install-deps: ${missing[*]} still missing after installing: apt removed them again" >&2
  exit 1
fi
for cmd in qemu-img qemu-system-x86_64 busybox mkfs.ext4 mkfs.vfat mcopy ip debootstrap; do
  command -v "$cmd" >/dev/null || PATH=$PATH:/usr/sbin:/sbin command -v "$cmd" >/dev/null || {
    echo "install-deps: $cmd not found although its package is installed" >&2
    exit 1
  }
done

if ! command -v cargo >/dev/null 2>&1; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    echo "install-deps: cargo is in $HOME/.cargo/bin; add it to PATH" >&2
  else
    echo "install-deps: no Rust toolchain (cargo) found; install it with rustup first" >&2
  fi
  exit 1
fi

# make lint needs rustfmt and clippy; rustup adds them where the toolchain came from rustup.
for tool in fmt clippy; do
  if ! cargo "$tool" --version >/dev/null 2>&1; then
    component=$([ "$tool" = fmt ] && echo rustfmt || echo clippy)
    if command -v rustup >/dev/null 2>&1; then
      echo "install-deps: adding the Rust component $component"
      rustup component add "$component"
    else
      echo "install-deps: cargo $tool is missing and there is no rustup to add $component" >&2
      exit 1
    fi
  fi
done
