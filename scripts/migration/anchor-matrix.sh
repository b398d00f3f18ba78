#!/bin/bash
# bare-migrate.py on the demo guest, idle and busy, in both modes, REPS times each: the figures of
# docs/migration.md. Usage: anchor-matrix.sh TEMPLATE_DIR WORKDIR [REPS] [extra bare-migrate args]
# (e.g. --qemu ... -L ... for another QEMU). Prints bare-migrate's JSON lines.
set -euo pipefail
here=$(dirname "$(readlink -f "$0")")
t=$1 w=$2 reps=${3:-3}
shift $(($# < 3 ? $# : 3))
mkdir -p "$w"
for load in idle busy; do
	python3 "$here/mkseed.py" "$w/$load-seed.img" "$here/workloads/$load.sh"
	# The busy loop's first pass ends about 6 s after the guest is ready: migrate while it runs.
	settle=$([ $load = busy ] && echo 8 || echo 2)
	for mode in pause live; do
		for _ in $(seq "$reps"); do
			python3 "$here/bare-migrate.py" --kernel "$t/vmlinux" --initrd "$t/initrd.cpio" --base "$t/disk.raw" \
				--seed "$w/$load-seed.img" --workload $load --mode $mode --settle-s "$settle" --verify-disk \
				--workdir "$w/run" "$@"
		done
	done
done
