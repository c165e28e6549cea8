#!/usr/bin/env bash
# The one-line join, for real on this machine: a manager (from the source tree) hands out
# the .deb of build/, the Space API makes a join token and its line, the line runs as root
# and installs, checks and joins; then sth runs from the package as its service user and
# the Space shows it connected with the token's tags. Purges afterwards. Run as root on a
# Debian 12 without systemd as PID 1 (CI runs it from .ci/run after test-deb.sh); under
# systemd, or on a fresh machine, use packaging/join-fresh-machine.sh. About 30 s.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
PYTHON=${PYTHON:-.venv/bin/python}

step() { printf '\n== %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }
ok() { printf '   ok: %s\n' "$*"; }

[ "$(id -u)" = 0 ] || fail "run as root (the line installs the package)"
[ -d /run/systemd/system ] && fail "this host runs systemd: use packaging/join-fresh-machine.sh"
if dpkg-query -W -f='${Status}' spacehub 2>/dev/null | grep -q installed; then
  fail "spacehub is installed here already; the test installs and purges it"
fi
command -v curl >/dev/null || { apt-get update -qq; apt-get install -y -qq curl >/dev/null; }

ls build/spacehub_*_all.deb >/dev/null 2>&1 || PYTHON=$PYTHON bash packaging/build-deb.sh
DEB=$PWD/$(ls build/spacehub_*_all.deb | tail -1)

TMP=$(mktemp -d)
CPM_PID=""
HUB_PID=""
cleanup() {
  for pid in $HUB_PID $CPM_PID; do kill "$pid" 2>/dev/null || true; done
  if dpkg-query -W -f='${Status}' spacehub 2>/dev/null | grep -q installed; then
    apt-get purge -y -qq spacehub >/dev/null 2>&1 || true
  fi
  rm -rf "$TMP"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

step "a manager that hands out $(basename "$DEB")"
"$PYTHON" -m cpm.main serve -P 0 --data-dir "$TMP/cpm" --space factory --package "$DEB" \
  > "$TMP/cpm.out" 2> "$TMP/cpm.log" &
CPM_PID=$!
for _ in $(seq 100); do grep -q '^Running' "$TMP/cpm.out" && break; sleep 0.2; done
grep -q '^Running' "$TMP/cpm.out" || { cat "$TMP/cpm.log"; fail "cpm did not start"; }
ADDRESS=$(sed -n 's/^API on //p' "$TMP/cpm.out")
API_TOKEN=$("$PYTHON" -m cpm.main token create --space factory --data-dir "$TMP/cpm")
ok "cpm on https://$ADDRESS, $(grep '^CA fingerprint' "$TMP/cpm.out")"

step "POST /join-tokens: the line"
curl -fsS --cacert "$TMP/cpm/ca.pem" -H "Authorization: Bearer $API_TOKEN" -H 'content-type: application/json' \
  -d '{"expires": 600, "description": "deb test", "tags": ["ci", "line"]}' \
  "https://$ADDRESS/api/v1/space/factory/api/v1/join-tokens" > "$TMP/made.json"
python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["command"])' "$TMP/made.json" > "$TMP/line"
[ -s "$TMP/line" ] && ! grep -q '^None$' "$TMP/line" || fail "no command: $(cat "$TMP/made.json")"
sed 's/shj_[A-Za-z0-9_-]*/shj_.../; s/^/   | /' "$TMP/line"

step "the line, as root"
start=$(date +%s)
(cd "$TMP" && sh -c "$(cat "$TMP/line")") 2>&1 | sed 's/^/   | /'
[ "${PIPESTATUS[0]}" = 0 ] || fail "the line failed"
[ "$(sth --version)" = "sth $(dpkg-query -W -f='${Version}' spacehub)" ] || fail "sth not installed"
grep -q '^space = "factory"' /etc/spacehub/sth.toml || fail "not joined in sth.toml"
[ -f /etc/spacehub/cpm-ca.pem ] || fail "the manager's CA was not kept for the hub"
ok "installed and configured in $(($(date +%s) - start)) s"

step "sth from the package, as spacehub, joins the Space"
PORT=$(free_port)
setpriv --reuid=spacehub --regid=spacehub --init-groups -- \
  env HOME=/var/lib/spacehub STATE_DIRECTORY=/var/lib/spacehub \
  /usr/bin/sth -c /etc/spacehub/sth.toml -P "$PORT" > "$TMP/sth.log" 2>&1 &
HUB_PID=$!
joined=""
for _ in $(seq 150); do
  curl -fsS --cacert "$TMP/cpm/ca.pem" -H "Authorization: Bearer $API_TOKEN" \
    "https://$ADDRESS/api/v1/space/factory/api/v1/list" > "$TMP/hubs.json" 2>/dev/null || true
  if python3 - "$TMP/hubs.json" <<'PY'
import json, sys
hubs = json.load(open(sys.argv[1]))
sys.exit(0 if any(h.get("state") == "connected" and h.get("tags") == ["ci", "line"] for h in hubs) else 1)
PY
  then joined=yes; break; fi
  kill -0 "$HUB_PID" 2>/dev/null || { cat "$TMP/sth.log"; fail "sth exited"; }
  sleep 0.2
done
[ -n "$joined" ] || { cat "$TMP/sth.log"; fail "the hub did not join: $(cat "$TMP/hubs.json")"; }
[ "$(ps -o user= -p "$HUB_PID")" = spacehub ] || fail "sth runs as $(ps -o user= -p "$HUB_PID")"
[ "$(stat -c %U /var/lib/spacehub/link.json)" = spacehub ] || fail "link.json not the service user's"
ok "connected, tags ci,line, running as spacehub: $(cat /var/lib/spacehub/link.json)"
kill -TERM "$HUB_PID"; wait "$HUB_PID" || true; HUB_PID=""

step "purge"
apt-get purge -y -qq spacehub >/dev/null
[ ! -e /usr/lib/spacehub ] && [ ! -e /etc/spacehub ] || fail "purge left files"
ok "purged"
printf '\nPASS: a fresh install joined the Space with one line\n'
