#!/usr/bin/env bash
# Install the _all.deb in a Debian 12 chroot of another architecture under qemu-user
# the way a user does, with the one line a manager's join token comes with (docs/joining.md),
# then run the hub there as its service user and check it joined the Space. By hand, not
# in CI (minutes per architecture).
#
#   bash packaging/qemu-test.sh [arm64|armhf ...]     (default: arm64 armhf)
#
# Chroots are cached in build/qemu/<arch> (delete to start over). Do not run this
# while a privileged systemd container runs: its systemd-binfmt wipes the host's
# binfmt_misc registrations (docs: /work/shared/platform.md §3).
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
ARCHES=("$@")
[ "$#" -gt 0 ] || ARCHES=(arm64 armhf)

[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
command -v debootstrap >/dev/null && [ -e /usr/bin/qemu-aarch64-static ] || {
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends debootstrap qemu-user-static binfmt-support >/dev/null
}
mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
update-binfmts --enable >/dev/null 2>&1 || true

ls build/spacehub_*_all.deb >/dev/null 2>&1 || make deb
DEB=$PWD/$(ls build/spacehub_*_all.deb | tail -1)
PYTHON=${PYTHON:-.venv/bin/python}

# The manager that hands out the package and the join tokens, on this machine's loopback
# (a chroot shares the host's network).
TMP=$(mktemp -d)
"$PYTHON" -m cpm.main serve -P 0 --data-dir "$TMP/cpm" --space lab --package "$DEB" > "$TMP/cpm.out" 2>"$TMP/cpm.log" &
CPM_PID=$!
trap 'kill $CPM_PID 2>/dev/null || true; rm -rf "$TMP"' EXIT
for _ in $(seq 100); do grep -q '^Running' "$TMP/cpm.out" && break; sleep 0.2; done
ADDRESS=$(sed -n 's/^API on //p' "$TMP/cpm.out")
API_TOKEN=$("$PYTHON" -m cpm.main token create --space lab --data-dir "$TMP/cpm")
SPACE_API="https://$ADDRESS/api/v1/space/lab/api/v1"
space_api() { curl -fsS --cacert "$TMP/cpm/ca.pem" -H "Authorization: Bearer $API_TOKEN" "$@"; }

for arch in "${ARCHES[@]}"; do
  root=$PWD/build/qemu/$arch
  echo "== $arch"
  start=$(date +%s)
  if [ ! -x "$root/usr/bin/apt-get" ]; then
    rm -rf "$root"; mkdir -p "$root"
    debootstrap --arch="$arch" --variant=minbase bookworm "$root" >/dev/null
    echo "   debootstrap: $(($(date +%s) - start)) s"
  fi
  cp /etc/resolv.conf "$root/etc/resolv.conf"
  mountpoint -q "$root/proc" || mount -t proc proc "$root/proc"  # psutil needs /proc
  trap 'umount "$root/proc" 2>/dev/null || true; kill $CPM_PID 2>/dev/null || true; rm -rf "$TMP"' EXIT
  chroot "$root" sh -c 'command -v curl >/dev/null || { apt-get update -qq && apt-get install -y -qq curl >/dev/null; }'
  space_api -H 'content-type: application/json' -d "{\"tags\": [\"$arch\"]}" "$SPACE_API/join-tokens" \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["command"])' > "$TMP/line"
  start=$(date +%s)
  chroot "$root" sh -c "$(cat "$TMP/line")" 2>&1 | sed 's/^/   | /'
  [ "${PIPESTATUS[0]}" = 0 ] || { echo "the line failed" >&2; exit 1; }
  echo "   the line (download, checksum, apt install, join): $(($(date +%s) - start)) s"
  chroot "$root" /usr/bin/sth --version
  chroot "$root" /usr/lib/spacehub/venv/bin/python -c \
    'import platform, cryptography, psutil, trio; print("  ", platform.machine(), "cryptography", cryptography.__version__, "psutil", psutil.__version__, "trio", trio.__version__)'
  port=18000
  chroot "$root" setpriv --reuid=spacehub --regid=spacehub --init-groups -- \
    env HOME=/var/lib/spacehub STATE_DIRECTORY=/var/lib/spacehub /usr/bin/sth -c /etc/spacehub/sth.toml -P $port \
    > "$root/tmp/sth.log" 2>&1 &
  pid=$!
  for _ in $(seq 150); do curl -sf "http://127.0.0.1:$port/api/v1/version" && break; sleep 0.4; done
  echo
  joined=""
  for _ in $(seq 100); do
    space_api "$SPACE_API/list" | python3 -c "import json,sys; sys.exit(0 if any(h['state'] == 'connected' and h['tags'] == ['$arch'] for h in json.load(sys.stdin)) else 1)" \
      && { joined=yes; break; }
    sleep 0.5
  done
  [ -n "$joined" ] || { cat "$root/tmp/sth.log"; echo "the $arch hub did not join" >&2; exit 1; }
  echo "   joined the Space: $(cat "$root/var/lib/spacehub/link.json" | tr -d '\n ')"
  kill -TERM "$pid"; wait "$pid" || true
  grep -q "API on" "$root/tmp/sth.log" || { cat "$root/tmp/sth.log"; exit 1; }
  chroot "$root" apt-get purge -y -qq spacehub >/dev/null
  [ ! -e "$root/usr/lib/spacehub" ] && [ ! -e "$root/var/lib/spacehub" ] && ! chroot "$root" getent passwd spacehub \
    || { echo "purge left files" >&2; exit 1; }
  umount "$root/proc"
  echo "   $arch: PASS"
done
