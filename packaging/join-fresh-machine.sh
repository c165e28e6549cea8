#!/usr/bin/env bash
# The one-line join on a fresh Debian 12 machine under systemd, by hand (about 2 minutes the
# first time, debootstrap included; not in CI): a minimal Debian made by debootstrap boots
# systemd in a privileged Podman container sharing this machine's network (so it reaches a
# manager on 127.0.0.1 and nothing else is needed); a real cpm from the source tree hands
# out build/'s .deb; the line the Space API returns is pasted into the machine as root; the
# hub must end up joined, healthy and running as its service user under sth.service.
#
#   bash packaging/join-fresh-machine.sh
#
# The root file system is cached in build/join-root (delete it to start over). Do not run
# this while packaging/qemu-test.sh runs: a privileged systemd container's systemd-binfmt
# wipes the host's binfmt_misc registrations (/work/shared/platform.md §3).
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
PYTHON=${PYTHON:-.venv/bin/python}
ROOTFS=$PWD/build/join-root
NAME=spacehub-join-test-$$

step() { printf '\n== %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }
ok() { printf '   ok: %s\n' "$*"; }

[ "$(id -u)" = 0 ] || fail "run as root"
command -v debootstrap >/dev/null || { apt-get update -qq; apt-get install -y -qq debootstrap >/dev/null; }
command -v podman >/dev/null || fail "podman is needed (docs/podman.md)"
ls build/spacehub_*_all.deb >/dev/null 2>&1 || PYTHON=$PYTHON bash packaging/build-deb.sh
DEB=$PWD/$(ls build/spacehub_*_all.deb | tail -1)

TMP=$(mktemp -d)
CPM_PID=""
cleanup() {
  podman rm -f -t 0 "$NAME" >/dev/null 2>&1 || true
  [ -n "$CPM_PID" ] && kill "$CPM_PID" 2>/dev/null || true
  rm -rf "$TMP"
}
trap cleanup EXIT

step "a fresh Debian 12 (debootstrap minbase + systemd, curl)"
start=$(date +%s)
if [ ! -x "$ROOTFS/lib/systemd/systemd" ]; then
  rm -rf "$ROOTFS"; mkdir -p "$ROOTFS"
  debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,curl,ca-certificates \
    bookworm "$ROOTFS" >/dev/null
  ok "debootstrap: $(($(date +%s) - start)) s, $(du -sh "$ROOTFS" | cut -f1)"
else
  ok "cached in $ROOTFS"
fi
# A pristine copy for each run: the package must meet a machine that never saw it.
cp -a "$ROOTFS" "$TMP/root"
cp /etc/resolv.conf "$TMP/root/etc/resolv.conf"
podman run -d --name "$NAME" --privileged --systemd=always --network=host --rootfs "$TMP/root" /sbin/init >/dev/null
for _ in $(seq 60); do
  state=$(podman exec "$NAME" systemctl is-system-running 2>/dev/null || true)
  case $state in running | degraded) break ;; esac
  sleep 0.5
done
ok "systemd is $state in the container"

step "a manager that hands out $(basename "$DEB")"
"$PYTHON" -m cpm.main serve -P 0 --data-dir "$TMP/cpm" --space factory --package "$DEB" \
  > "$TMP/cpm.out" 2> "$TMP/cpm.log" &
CPM_PID=$!
for _ in $(seq 100); do grep -q '^Running' "$TMP/cpm.out" && break; sleep 0.2; done
grep -q '^Running' "$TMP/cpm.out" || { cat "$TMP/cpm.log"; fail "cpm did not start"; }
ADDRESS=$(sed -n 's/^API on //p' "$TMP/cpm.out")
API_TOKEN=$("$PYTHON" -m cpm.main token create --space factory --data-dir "$TMP/cpm")
SPACE_API="https://$ADDRESS/api/v1/space/factory/api/v1"
curl -fsS --cacert "$TMP/cpm/ca.pem" -H "Authorization: Bearer $API_TOKEN" -H 'content-type: application/json' \
  -d '{"description": "fresh machine", "tags": ["debootstrap"]}' "$SPACE_API/join-tokens" > "$TMP/made.json"
python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["command"])' "$TMP/made.json" > "$TMP/line"
ok "the line: $(sed 's/shj_[A-Za-z0-9_-]*/shj_.../' "$TMP/line")"

step "the line, pasted as root on the fresh machine"
start=$(date +%s)
podman exec "$NAME" sh -c "$(cat "$TMP/line")" 2>&1 | sed 's/^/   | /'
[ "${PIPESTATUS[0]}" = 0 ] || fail "the line failed"
ok "in $(($(date +%s) - start)) s"

step "joined, healthy, running as spacehub under systemd"
for _ in $(seq 100); do
  curl -fsS --cacert "$TMP/cpm/ca.pem" -H "Authorization: Bearer $API_TOKEN" "$SPACE_API/list" > "$TMP/hubs.json"
  python3 - "$TMP/hubs.json" <<'PY' && break
import json, sys
hubs = json.load(open(sys.argv[1]))
sys.exit(0 if any(h.get("state") == "connected" and h.get("healthy") for h in hubs) else 1)
PY
  sleep 0.3
done
python3 - "$TMP/hubs.json" <<'PY' || fail "not connected and healthy: $(cat "$TMP/hubs.json")"
import json, sys
(hub,) = json.load(open(sys.argv[1]))
assert hub["state"] == "connected" and hub["healthy"] and hub["tags"] == ["debootstrap"], hub
print(f"   ok: {hub['id']} connected and healthy, tags {hub['tags']}, {hub['description']!r}")
PY
[ "$(podman exec "$NAME" systemctl is-enabled sth)" = enabled ] || fail "sth.service not enabled"
[ "$(podman exec "$NAME" systemctl is-active sth)" = active ] || fail "sth.service not active"
pid=$(podman exec "$NAME" systemctl show -p MainPID --value sth)
user=$(podman exec "$NAME" stat -c %U "/proc/$pid")
[ "$user" = spacehub ] || fail "sth runs as $user"
ok "sth.service enabled and active, main PID $pid runs as $user"
printf '\nPASS: a fresh Debian machine joined the Space with one line, under systemd\n'
