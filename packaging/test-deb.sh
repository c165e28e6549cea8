#!/usr/bin/env bash
# Build the .deb, lint it, install it on this machine, check it, run the hub from
# it as the service user, then purge it and check nothing is left. Run as root on
# Debian 12 (CI runs it from .ci/run). About a minute.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive

# systemd-analyze security exposure gates, in tenths (35 = 3.5). Measured: sth 2.9, cpm 1.3.
# sth keeps devices, user namespaces and W+X memory for its Instances; see packaging/README.md.
STH_THRESHOLD=35
CPM_THRESHOLD=20

step() { printf '\n== %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }
ok() { printf '   ok: %s\n' "$*"; }

[ "$(id -u)" = 0 ] || fail "run as root (it installs and purges the package)"
[ -d /run/systemd/system ] && fail "this host runs systemd: the test would start sth.service for real; use a chroot or a VM"

step "tools"
need=()
command -v lintian >/dev/null || need+=(lintian)
command -v dpkg-parsechangelog >/dev/null || need+=(dpkg-dev)
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v curl >/dev/null || need+=(curl)
command -v groff >/dev/null || need+=(groff-base)
apt-get update -qq
if [ ${#need[@]} -gt 0 ]; then apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null; fi
ok "lintian $(lintian --version | awk '{print $2}'), $(systemd-analyze --version | head -1)"

HUB_PID=""
NOTIFY_PID=""
TMP=$(mktemp -d)
cleanup() {
  for pid in $HUB_PID $NOTIFY_PID; do kill "$pid" 2>/dev/null || true; done
  if dpkg-query -W -f='${Status}' spacehub 2>/dev/null | grep -q installed; then
    apt-get purge -y -qq spacehub >/dev/null 2>&1 || true
  fi
  rm -rf "$TMP"
}
trap cleanup EXIT

step "build"
PYTHON=${PYTHON:-.venv/bin/python} bash packaging/build-deb.sh
VERSION=$(dpkg-parsechangelog -l packaging/debian/changelog -S Version)
DEB=$(ls build/spacehub_*_all.deb)

step "lintian (errors and warnings fail; overrides in packaging/debian/lintian-overrides)"
lintian -I --pedantic "$DEB" 2>&1 | grep -v '^running with root' | sed 's/^/   | /' || true
lintian --fail-on error,warning "$DEB" >/dev/null 2>&1 || fail "lintian"
ok "no E: or W:"

step "install"
if dpkg-query -W -f='${Status}' spacehub 2>/dev/null | grep -q installed; then
  apt-get purge -y -qq spacehub >/dev/null
fi
start=$(date +%s)
apt-get install -y -qq --no-install-recommends "./$DEB" >/dev/null
ok "apt-get install in $(($(date +%s) - start)) s"

step "commands"
[ "$(sth --version)" = "sth $VERSION" ] || fail "sth --version: $(sth --version)"
ok "$(sth --version) ($(readlink -f /usr/bin/sth))"
cpm --help >/dev/null && ok "cpm --help"
si --help >/dev/null && ok "si --help"
for cmd in sth cpm si; do
  page=/usr/share/man/man1/$cmd.1.gz
  [ -f "$page" ] || fail "no man page for $cmd"
  # man's own warnings (bad requests, unknown escapes) fail the page.
  warnings=$(zcat "$page" | groff -man -Tutf8 -ww -z 2>&1 || true)
  [ -z "$warnings" ] || fail "man page $cmd: $warnings"
  zgrep -q '^\.SH OPTIONS' "$page" || fail "man page $cmd has no OPTIONS"
done
zgrep -q '^\.SS si seq deploy' /usr/share/man/man1/si.1.gz || fail "man si lacks si seq deploy"
ok "man pages sth(1), cpm(1), si(1): every subcommand, no groff warnings"
zcat /usr/share/doc/spacehub/README.md.gz | grep -q '^# Spacehub' || fail "no README in /usr/share/doc/spacehub"
ok "/usr/share/doc/spacehub/README.md.gz"
/usr/lib/spacehub/venv/bin/python - <<'PY' || fail "the venv's dependencies"
import importlib.metadata as md, sys
import cryptography, psutil
pins = dict(l.strip().split("==") for l in open("/usr/lib/spacehub/requirements.txt") if "==" in l)
for name, version in pins.items():
    assert md.version(name) == version, f"{name} {md.version(name)} is not the pinned {version}"
for mod in (cryptography, psutil):  # compiled: Debian's copies
    assert mod.__file__.startswith("/usr/lib/python3/dist-packages/"), mod.__file__
print(f"   ok: Python {sys.version.split()[0]}, {len(pins)} pins honoured, "
      f"cryptography {cryptography.__version__} and psutil {psutil.__version__} from Debian")
PY

step "user, config, state"
getent passwd spacehub | grep -q ':/var/lib/spacehub:/usr/sbin/nologin$' || fail "user: $(getent passwd spacehub)"
ok "user $(getent passwd spacehub)"
for f in sth.toml cpm.toml; do
  [ "$(stat -c '%a %U:%G' /etc/spacehub/$f)" = "640 root:spacehub" ] || fail "$f: $(stat -c '%a %U:%G' /etc/spacehub/$f)"
  dpkg-query --showformat='${Conffiles}\n' --show spacehub | grep -q "/etc/spacehub/$f " || fail "$f is not a conffile"
  if grep -Eq '^[[:space:]]*[a-z_]+[[:space:]]*=' /etc/spacehub/$f; then fail "$f has an active option"; fi
done
ok "sth.toml, cpm.toml: conffiles, 0640 root:spacehub, every option commented"
[ "$(stat -c '%a %U' /var/lib/spacehub)" = "750 spacehub" ] || fail "/var/lib/spacehub: $(stat -c '%a %U' /var/lib/spacehub)"
ok "/var/lib/spacehub 0750 spacehub"

step "systemd units"
for unit in sth cpm; do
  err=$(systemd-analyze verify "/lib/systemd/system/$unit.service" 2>&1 >/dev/null) || true
  [ -z "$err" ] || fail "systemd-analyze verify $unit.service: $err"
  ok "verify $unit.service: silent"
done
for pair in "sth $STH_THRESHOLD" "cpm $CPM_THRESHOLD"; do
  set -- $pair
  score=$(systemd-analyze security --offline=yes "/lib/systemd/system/$1.service" 2>/dev/null | tail -1)
  systemd-analyze security --offline=yes --threshold="$2" "/lib/systemd/system/$1.service" >/dev/null 2>&1 \
    || fail "$1.service exposure above $2/10: $score"
  ok "${score#→ } (gate: $2/10)"
done

step "run sth from the installed venv as spacehub"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
chmod 0755 "$TMP"
# A fake systemd: the first datagram the hub sends must be READY=1.
python3 - "$TMP/notify.sock" "$TMP/notify.out" <<'PY' &
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1])
import os; os.chmod(sys.argv[1], 0o777)
s.settimeout(60)
open(sys.argv[2], "w").write(s.recv(4096).decode())
PY
NOTIFY_PID=$!
for _ in $(seq 50); do [ -S "$TMP/notify.sock" ] && break; sleep 0.1; done
# setpriv, not runuser: it execs, so $! is sth itself and SIGTERM reaches it directly
# (runuser would SIGKILL it 2 s after passing the SIGTERM on).
setpriv --reuid=spacehub --regid=spacehub --init-groups -- \
  env HOME=/var/lib/spacehub STATE_DIRECTORY=/var/lib/spacehub NOTIFY_SOCKET="$TMP/notify.sock" \
  /usr/bin/sth -c /etc/spacehub/sth.toml -P "$PORT" > "$TMP/sth.log" 2>&1 &
HUB_PID=$!
for _ in $(seq 100); do
  curl -sf "http://127.0.0.1:$PORT/api/v1/version" > "$TMP/version.json" 2>/dev/null && break
  kill -0 "$HUB_PID" 2>/dev/null || { cat "$TMP/sth.log"; fail "sth exited"; }
  sleep 0.2
done
grep -q "\"version\": *\"$VERSION\"" "$TMP/version.json" || { cat "$TMP/sth.log"; fail "/api/v1/version: $(cat "$TMP/version.json")"; }
grep -q "\"build\": *\"$VERSION+git\." "$TMP/version.json" || fail "/api/v1/version has no build stamp: $(cat "$TMP/version.json")"
ok "GET /api/v1/version: $(cat "$TMP/version.json")"
wait "$NOTIFY_PID" || true; NOTIFY_PID=""
grep -q '^READY=1' "$TMP/notify.out" || fail "no READY=1: $(cat "$TMP/notify.out")"
ok "sd_notify: $(tr '\n' ' ' < "$TMP/notify.out")"
[ "$(stat -c %U /var/lib/spacehub/sequences)" = spacehub ] || fail "state not written as spacehub"
start=$(date +%s%N)
kill -TERM "$HUB_PID"; wait "$HUB_PID" || true; HUB_PID=""
ok "stopped on SIGTERM in $(( ($(date +%s%N) - start) / 1000000 )) ms (TimeoutStopSec=20s)"
sed 's/^/   | /' "$TMP/sth.log" | tail -4

step "upgrade: install the .deb over itself with an instance running"
python3 - "$TMP/counter.tar.gz" <<'PY'
import io, json, sys, tarfile
source = b"""import asyncio
async def run(context, input, *args):
    n = 0
    while True:
        yield f"{n}\\n"
        n += 1
        await asyncio.sleep(0.05)
"""
with tarfile.open(sys.argv[1], "w:gz") as tar:
    for name, data in (("package.json", json.dumps({"name": "counter", "version": "1.0.0", "main": "main.py",
                        "engines": {"python3": "3"}}).encode()), ("main.py", source)):
        info = tarfile.TarInfo(name); info.size = len(data); tar.addfile(info, io.BytesIO(data))
PY
start_hub() {
  setpriv --reuid=spacehub --regid=spacehub --init-groups -- \
    env HOME=/var/lib/spacehub STATE_DIRECTORY=/var/lib/spacehub \
    /usr/bin/sth -c /etc/spacehub/sth.toml -P "$PORT" >> "$TMP/sth.log" 2>&1 &
  HUB_PID=$!
  for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$PORT/api/v1/version" >/dev/null 2>&1 && return 0
    kill -0 "$HUB_PID" 2>/dev/null || { cat "$TMP/sth.log"; fail "sth exited"; }
    sleep 0.2
  done
  fail "sth did not answer"
}
API="http://127.0.0.1:$PORT/api/v1"
start_hub
SEQ=$(curl -sf -X POST -H 'content-type: application/octet-stream' --data-binary @"$TMP/counter.tar.gz" "$API/sequence" \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
curl -sf -X POST -H 'content-type: application/json' -d '{"instanceId": "upgrade-1"}' "$API/sequence/$SEQ/start" >/dev/null \
  || fail "start"
PID=$(curl -sf "$API/instance/upgrade-1/health" | python3 -c 'import json,sys; print(json.load(sys.stdin)["processId"])')
kill -TERM "$HUB_PID"; wait "$HUB_PID" || true; HUB_PID=""
kill -0 "$PID" || fail "the instance ended with the hub"
start=$(date +%s)
apt-get install -y -qq --no-install-recommends --reinstall "./$DEB" >/dev/null
ok "installed over itself in $(($(date +%s) - start)) s; runner $PID still running"
kill -0 "$PID" || fail "the instance ended with the upgrade"
start_hub
curl -sf "$API/instance/upgrade-1" | grep -q '"status": *"running"' || fail "not taken back: $(curl -s "$API/instances")"
NOW=$(curl -sf "$API/instance/upgrade-1/health" | python3 -c 'import json,sys; print(json.load(sys.stdin)["processId"])')
[ "$NOW" = "$PID" ] || fail "pid $PID became $NOW"
FIRST=$(curl -s --max-time 1 "$API/instance/upgrade-1/output?offset=0" | head -c 2 || true)
[ "$FIRST" = "0" ] || fail "output from offset 0: $FIRST"  # "0\n", its newline cut by $( )
ok "taken back by the upgraded hub: running, pid $PID, output from its first byte"
kill -TERM "$HUB_PID"; wait "$HUB_PID" || true; HUB_PID=""
setpriv --reuid=spacehub --regid=spacehub --init-groups -- env HOME=/var/lib/spacehub STATE_DIRECTORY=/var/lib/spacehub \
  /usr/bin/sth stop-instances -c /etc/spacehub/sth.toml | sed 's/^/   | /'
for _ in $(seq 50); do kill -0 "$PID" 2>/dev/null || break; sleep 0.1; done
kill -0 "$PID" 2>/dev/null && fail "sth stop-instances left $PID running"
ok "sth stop-instances ended it"

step "sth join"
sth join --cpm-url wss://cpm.example:9000 --space factory --join-token shj_test \
  --cpm-fingerprint "$(printf 'ab%.0s' $(seq 32))" | sed 's/^/   | /'
[ "$(stat -c '%a %U:%G' /etc/spacehub/sth.toml)" = "640 root:spacehub" ] || fail "sth.toml after join"
grep -q '^join_token = "shj_test"' /etc/spacehub/sth.toml || fail "no join_token line"
grep -q '^# join_token = ""' /etc/spacehub/sth.toml || fail "the comments were not kept"
runuser -u spacehub -- /usr/lib/spacehub/venv/bin/python -c \
  'from pathlib import Path; from agent.config import load_config as l; c = l(Path("/etc/spacehub/sth.toml"), {}); assert c.space == "factory"' \
  || fail "the service user cannot load the joined config"
ok "link keys written, comments kept, 0640 root:spacehub, readable by spacehub"

step "remove keeps config and state"
apt-get remove -y -qq spacehub >/dev/null
[ -f /etc/spacehub/sth.toml ] && [ -d /var/lib/spacehub/sequences ] || fail "remove dropped config or state"
[ ! -e /usr/lib/spacehub ] || fail "/usr/lib/spacehub left after remove: $(ls -A /usr/lib/spacehub)"
ok "/etc/spacehub and /var/lib/spacehub kept; /usr/lib/spacehub gone"

step "purge leaves nothing"
apt-get purge -y -qq spacehub >/dev/null
left=()
for p in /usr/lib/spacehub /etc/spacehub /var/lib/spacehub /usr/bin/sth /usr/bin/cpm /usr/bin/si \
         /lib/systemd/system/sth.service /etc/systemd/system/multi-user.target.wants/sth.service \
         /var/lib/systemd/deb-systemd-helper-enabled/sth.service.dsh-also \
         /var/lib/systemd/deb-systemd-helper-masked/sth.service; do
  [ -e "$p" ] || [ -L "$p" ] && left+=("$p")
done
getent passwd spacehub >/dev/null && left+=("user spacehub")
getent group spacehub >/dev/null && left+=("group spacehub")
[ ${#left[@]} -eq 0 ] || fail "left after purge: ${left[*]}"
ok "no files, no user, no group"

printf '\nPASS: spacehub %s .deb built, linted, installed, run, purged\n' "$VERSION"
