#!/usr/bin/env bash
# The demo: an all-in-one Shoal with three simulated hosts, one template, one profile, and a
# six-VM virtual cluster deployed through the CLI, then printed. DEMO_KEEP=1 keeps it running
# until Ctrl-C so that you can try the CLI against it.
set -euo pipefail
SHOAL=${1:-target/release/shoal}
SHOAL=$(realpath "$SHOAL")
DATA=$(mktemp -d /tmp/shoal-demo.XXXXXX)
PORT=${DEMO_PORT:-7700}
export SHOAL_URL="http://127.0.0.1:$PORT"

"$SHOAL" up --hosts 3 --driver sim --listen "127.0.0.1:$PORT" --data-dir "$DATA" \
  --host-cpus 8 --host-memory 16384 2>"$DATA/up.log" &
UP=$!
cleanup() {
  kill -INT "$UP" 2>/dev/null && wait "$UP" 2>/dev/null || true
  rm -rf "$DATA"
}
trap cleanup EXIT

for _ in $(seq 100); do
  "$SHOAL" host list >/dev/null 2>&1 && break
  kill -0 "$UP" 2>/dev/null || { cat "$DATA/up.log" >&2; exit 1; }
  sleep 0.1
done

set -x
"$SHOAL" host list
# A stand-in disk image for now: 64 MiB, mostly sparse, with a recognisable head.
truncate -s 64M "$DATA/demo.img"
printf 'shoal demo image\n' | dd of="$DATA/demo.img" conv=notrunc status=none
"$SHOAL" template import demo "$DATA/demo.img"
"$SHOAL" profile create small --template demo --cpus 1 --memory 512MiB
"$SHOAL" profile create medium --parent small --cpus 2
"$SHOAL" cluster create lab --profile medium --size 6 --anti-affinity none --wait
"$SHOAL" cluster list
"$SHOAL" vm list --cluster lab
"$SHOAL" host list
set +x

if [ "${DEMO_KEEP:-0}" = 1 ]; then
  echo "Shoal is running at $SHOAL_URL (data in $DATA); Ctrl-C to stop."
  wait "$UP"
fi
