#!/usr/bin/env bash
# The demo: an all-in-one Shoal with three hosts running real QEMU VMs (KVM if it works here,
# else TCG), the demo template built from this machine's kernel and busybox, and a three-VM
# virtual cluster deployed through the CLI. It waits until every guest printed `ready`, prints
# the cluster, and keeps running until Ctrl-C. With --exit it tears everything down and exits.
set -euo pipefail
SHOAL=${1:-target/release/shoal}
SHOAL=$(realpath "$SHOAL")
EXIT=0
[ "${2:-}" = "--exit" ] && EXIT=1
DATA=$(mktemp -d /tmp/shoal-demo.XXXXXX)
PORT=${DEMO_PORT:-7700}
export SHOAL_URL="http://127.0.0.1:$PORT"

"$SHOAL" up --hosts 3 --driver qemu --listen "127.0.0.1:$PORT" --data-dir "$DATA" \
  --host-cpus 2 --host-memory 2048 2>"$DATA/up.log" &
UP=$!
cleanup() {
  "$SHOAL" cluster delete lab --wait >/dev/null 2>&1 || true
  "$SHOAL" cluster delete mover --wait >/dev/null 2>&1 || true
  kill -INT "$UP" 2>/dev/null && wait "$UP" 2>/dev/null || true
  rm -rf "$DATA"
}
trap cleanup EXIT

for _ in $(seq 300); do
  [ "$("$SHOAL" --output json host list 2>/dev/null | grep -c '"name"')" = 3 ] && break
  kill -0 "$UP" 2>/dev/null || { cat "$DATA/up.log" >&2; exit 1; }
  sleep 0.1
done

set -x
"$SHOAL" host list
"$SHOAL" template build-demo demo
"$SHOAL" profile create tiny --template demo --cpus 1 --memory 128MiB
"$SHOAL" cluster create lab --profile tiny --size 3 --anti-affinity host --wait
set +x

echo
echo "What each guest printed on its console:"
for vm in lab-0 lab-1 lab-2; do
  "$SHOAL" vm console "$vm" | grep -a '^ready' || { echo "$vm did not print ready" >&2; exit 1; }
done
echo
"$SHOAL" cluster show lab
echo
"$SHOAL" vm list --cluster lab

# A running guest moves to another host: its own disk blocks, then its memory, no shared storage.
echo
set -x
"$SHOAL" cluster create mover --profile tiny --size 1 --wait >/dev/null
FROM=$("$SHOAL" --output json vm show mover-0 | sed -n 's/.*"host": *"\([^"]*\)".*/\1/p')
"$SHOAL" vm migrate mover-0 --wait
set +x
TO=$("$SHOAL" --output json vm show mover-0 | sed -n 's/.*"host": *"\([^"]*\)".*/\1/p')
[ -n "$TO" ] && [ "$TO" != "$FROM" ] || { echo "mover-0 did not move from $FROM" >&2; exit 1; }
echo "mover-0 moved from $FROM to $TO and runs there."

if [ "$EXIT" = 0 ]; then
  echo
  echo "Shoal is running at $SHOAL_URL (data in $DATA). Try: shoal vm console lab-0 --follow,"
  echo "shoal cluster suspend lab, shoal cluster resume lab, shoal vm migrate mover-0. Ctrl-C stops and removes everything."
  wait "$UP"
fi
