#!/usr/bin/env bash
# A virtual cluster of real Debian: `shoal template build-debian` (debootstrap from this machine's
# mirror, cached under /var/cache/shoal/templates), a controller and one host agent with the
# bridge network driver in a network namespace of their own (so nothing changes on this
# machine's own network), a 2-VM cluster with a login user, an SSH key and user data, ready once
# each guest reported that cloud-init succeeded; then an SSH login into one guest. With --exit it
# tears everything down and exits; otherwise it keeps running until Ctrl-C.
set -euo pipefail
SHOAL=$(realpath "${1:-target/release/shoal}")
EXIT=0
[ "${2:-}" = "--exit" ] && EXIT=1
[ "$(id -u)" = 0 ] || { echo "demo-debian: run as root (network namespace, bridge)" >&2; exit 1; }

DATA=$(mktemp -d /tmp/shoal-demo-debian.XXXXXX)
NS=shoal-demo-$$
HOSTSIDE=shdv$$
PORT=${DEMO_PORT:-7711}
export SHOAL_URL="http://10.254.$(( $$ % 200 )).2:$PORT"
NET=10.254.$(( $$ % 200 ))
PIDS=()
cleanup() {
  set +e
  "$SHOAL" cluster delete dlab --wait >/dev/null 2>&1
  for p in "${PIDS[@]}"; do kill -INT "$p" 2>/dev/null; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null; done
  ip netns del "$NS" 2>/dev/null
  ip link del "$HOSTSIDE" 2>/dev/null
  rm -rf "$DATA"
}
trap cleanup EXIT

# The host's namespace: its own underlay address, reached from here over a veth pair.
ip netns add "$NS"
ip link add "$HOSTSIDE" type veth peer name eth0 netns "$NS"
ip addr add "$NET.1/24" dev "$HOSTSIDE"
ip link set "$HOSTSIDE" up
ip -n "$NS" link set lo up
ip -n "$NS" addr add "$NET.2/24" dev eth0
ip -n "$NS" link set eth0 up

ip netns exec "$NS" "$SHOAL" server --listen "$NET.2:$PORT" --data-dir "$DATA/ctl" 2>"$DATA/server.log" &
PIDS+=($!)
for _ in $(seq 300); do [ -s "$DATA/ctl/admin.token" ] && break; sleep 0.1; done
export SHOAL_TOKEN=$(cat "$DATA/ctl/admin.token")
for _ in $(seq 300); do "$SHOAL" host list >/dev/null 2>&1 && break; sleep 0.1; done
TOKEN=$("$SHOAL" host join-token)
ip netns exec "$NS" "$SHOAL" agent --name h1 --driver qemu --net bridge --underlay-ip "$NET.2" \
  --controller "$SHOAL_URL" --join-token "$TOKEN" --listen "$NET.2:0" --data-dir "$DATA/h1" \
  --host-cpus 2 --host-memory 4096 --ready-timeout 900 2>"$DATA/agent.log" &
PIDS+=($!)
for _ in $(seq 300); do
  [ "$("$SHOAL" --output json host list 2>/dev/null | grep -c '"name"')" = 1 ] && break
  sleep 0.1
done

ssh-keygen -q -t ed25519 -N '' -C shoal-demo -f "$DATA/id_ed25519"
cat >"$DATA/user-data" <<'EOF'
#cloud-config
runcmd:
  - [sh, -c, "echo 'configured by the user data of the demo' > /etc/motd"]
EOF

set -x
"$SHOAL" template build-debian debian
"$SHOAL" profile create deb --template debian --cpus 1 --memory 1GiB --user demo \
  --ssh-key "$DATA/id_ed25519.pub" --user-data "$DATA/user-data"
"$SHOAL" cluster create dlab --profile deb --size 2 --nat --wait
"$SHOAL" vm list --cluster dlab
set +x

IP=$("$SHOAL" --output json vm show dlab-0 | sed -n 's/.*"ip": *"\([0-9.]*\)".*/\1/p' | head -n 1)
echo
echo "Logging into dlab-0 ($IP) over SSH as demo:"
ip netns exec "$NS" ssh -i "$DATA/id_ed25519" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
  -o LogLevel=ERROR "demo@$IP" \
  'echo "hostname: $(hostname)"; ip -4 -brief addr show eth0; ip -4 route show default;
   cat /etc/motd; cloud-init status; sudo -n true && echo "sudo: ok"'

if [ "$EXIT" = 0 ]; then
  echo
  echo "Shoal is running at $SHOAL_URL (SHOAL_TOKEN=$SHOAL_TOKEN). The guests are reachable from the"
  echo "host's namespace: ip netns exec $NS ssh -i $DATA/id_ed25519 demo@$IP"
  echo "Ctrl-C stops and removes everything."
  wait "${PIDS[0]}"
fi
