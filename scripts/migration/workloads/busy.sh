#!/bin/sh
# Busy guest: the ticker of idle.sh, plus a loop that rewrites a 32 MiB tmpfs file in place, pass
# after pass, and then checks it. Each pass fills the file with 64-byte lines "seq N" (N the pass
# number, so 64 lines per 4 KiB page); afterwards every line must read the same. A page whose
# newest contents the migration missed still holds an older pass's lines, and the check prints
# `BAD`. A guest whose kernel or shell memory was corrupted crashes or stops printing instead.
MB=${MB:-32}
f=/tmp/busy
mkfifo /run/tick
exec 3<>/run/tick
(
	n=0
	while :; do
		n=$((n + 1))
		echo "tick $n"
		read -t 0.01 x <&3
	done
) &
fill() {
	yes "$(printf '%-63s' "seq $1")" | head -c $((MB * 1048576)) | dd of=$f bs=1M conv=notrunc 2>/dev/null
}
check() {
	got=$(uniq $f | head -n 3 | tr '\n' '|')
	[ "$got" = "$(printf '%-63s' "seq $1")|" ]
}
# Self-test: one stale page in the middle of the file must be caught.
fill 0
yes "$(printf '%-63s' "seq -1")" | head -c 4096 | dd of=$f bs=4096 seek=$((MB * 128)) conv=notrunc 2>/dev/null
if check 0; then echo "selftest FAILED: a stale page went unnoticed"; else echo "selftest ok"; fi
seq=0
while :; do
	seq=$((seq + 1))
	# Marks where the pass is, so that the host knows what a migration interrupted.
	echo "fill $seq"
	fill $seq
	echo "check $seq"
	if check $seq; then
		echo "busy $seq ok"
	else
		echo "BAD pass $seq: $got"
	fi
done
