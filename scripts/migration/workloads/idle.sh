#!/bin/sh
# Idle guest for bare-migrate.py: only the ticker, a counted line about every 10 ms, so that the
# host can time the pause the guest sees and check that the counter goes on from where it stopped.
# `read -t` on a fifo we hold open both ways is a 10 ms sleep without a fork (a forked `sleep`
# costs several ms under TCG).
mkfifo /run/tick
exec 3<>/run/tick
n=0
while :; do
	n=$((n + 1))
	echo "tick $n"
	read -t 0.01 x <&3
done
