#!/bin/bash
# Unpacks bookworm-backports' QEMU (10.0.2) into DIR (default /tmp/qemu-new) without installing
# it: a private apt state dir (the system's lists and sources are left alone), `apt-get download`,
# `dpkg-deb -x`. The backport is built for bookworm, so it runs on this glibc with the system's
# libraries; its firmware (SeaBIOS, option ROMs) comes from its own -L dirs. Prints the arguments
# to hand dirty-check.py or bare-migrate.py.
set -euo pipefail
dir=${1:-/tmp/qemu-new}
apt=$dir.apt
ver=1:10.0.2+ds-2+deb13u1~bpo12+1
mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)
mkdir -p "$apt"/{lists/partial,cache/archives/partial,debs}
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror bookworm-backports main" >"$apt/sources.list"
opts=(-o Dir::Etc::sourcelist="$apt/sources.list" -o Dir::Etc::sourceparts=/nonexistent
	-o Dir::State::Lists="$apt/lists" -o Dir::Cache="$apt/cache" -o APT::Sandbox::User=root)
apt-get "${opts[@]}" update >/dev/null
(cd "$apt/debs" && apt-get "${opts[@]}" download qemu-system-x86="$ver" qemu-system-common="$ver" \
	qemu-system-data="$ver" qemu-utils="$ver" seabios=1.16.3-2~bpo12+1 >/dev/null)
for d in "$apt"/debs/*.deb; do dpkg-deb -x "$d" "$dir"; done
"$dir/usr/bin/qemu-system-x86_64" --version | head -n 1 >&2
echo "--qemu $dir/usr/bin/qemu-system-x86_64 -L $dir/usr/share/qemu -L $dir/usr/share/seabios"
