#!/bin/sh
# Spacehub hub installer. A Spacehub manager (cpm) serves this at <manager>/install.sh with
# its own address and the package it hands out filled in below; docs/joining.md explains it.
#
#   sh install.sh --space NAME --join-token shj_... [--ca-file CA.pem] [--description TEXT]
#                 [--tags A,B] [--no-start]
#
# As root, on Debian 12 or Raspberry Pi OS (amd64, arm64, armhf). It downloads the
# package from the manager (over TLS checked with --ca-file when given), checks its
# SHA-256, installs it with apt (which pulls Python and the rest from Debian), writes the
# link settings with `sth join`, then enables and starts sth.service and waits until the
# hub has joined. The join token may come in $SPACEHUB_JOIN_TOKEN instead.
set -eu

# @MANAGER_SETTINGS@

say() { printf 'spacehub: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

space=""
token=${SPACEHUB_JOIN_TOKEN:-}
ca_file=""
description=""
tags=""
start=yes
while [ $# -gt 0 ]; do
	case $1 in
	--space | --join-token | --ca-file | --description | --tags)
		[ $# -ge 2 ] || die "$1 needs a value"
		case $1 in
		--space) space=$2 ;;
		--join-token) token=$2 ;;
		--ca-file) ca_file=$2 ;;
		--description) description=$2 ;;
		--tags) tags=$2 ;;
		esac
		shift 2
		;;
	--no-start) start=no; shift ;;
	-h | --help) sed -n '2,12p' "$0" 2>/dev/null || true; exit 0 ;;
	*) die "unknown option: $1 (see the top of this script)" ;;
	esac
done

[ -n "$space" ] || die "--space NAME is needed"
[ -n "$token" ] || die "--join-token shj_... is needed (ask the Space's operator for one)"
[ "$(id -u)" = 0 ] || die "run as root: ... | sudo sh -s -- ..."
[ -n "$SPACEHUB_PACKAGE" ] || die "the manager has no package to hand out: $SPACEHUB_PACKAGE_MISSING"
command -v apt-get >/dev/null && command -v dpkg >/dev/null \
	|| die "this installer is for Debian and Raspberry Pi OS (apt and dpkg); install by hand: docs/joining.md"
command -v curl >/dev/null || die "curl is needed: apt-get install -y curl"
if [ -n "$ca_file" ] && [ ! -r "$ca_file" ]; then die "cannot read the CA file $ca_file"; fi

arch=$(dpkg --print-architecture)
system=$(. /etc/os-release 2>/dev/null && echo "${PRETTY_NAME:-unknown}") || system=unknown
say "installing ${SPACEHUB_PACKAGE} on $system ($arch) from $SPACEHUB_URL"
case $arch in
amd64 | arm64 | armhf) ;;
*) say "warning: $arch is not one of the tested architectures (amd64, arm64, armhf)" ;;
esac

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
deb=$work/$SPACEHUB_PACKAGE
if [ -n "$ca_file" ]; then
	curl -fsS --proto '=https' --cacert "$ca_file" -o "$deb" "$SPACEHUB_URL/install/$SPACEHUB_PACKAGE"
else
	curl -fsS -o "$deb" "$SPACEHUB_URL/install/$SPACEHUB_PACKAGE"
fi
echo "$SPACEHUB_PACKAGE_SHA256  $deb" | sha256sum -c --status \
	|| die "the package's SHA-256 is not the one the manager announced; nothing was installed"
say "package checked (sha256 $SPACEHUB_PACKAGE_SHA256)"

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "$deb" >/dev/null
say "installed $(sth --version)"

# The token goes through stdin: it is then in no process list.
set -- --cpm-url "$SPACEHUB_LINK_URL" --space "$space" --join-token -
if [ -n "$ca_file" ]; then set -- "$@" --cpm-ca "$ca_file"; fi
if [ -n "$description" ]; then set -- "$@" --description "$description"; fi
if [ -n "$tags" ]; then set -- "$@" --tags "$tags"; fi
printf '%s\n' "$token" | sth join "$@" >/dev/null
say "link settings written to /etc/spacehub/sth.toml"

if [ "$start" = no ]; then
	say "done; start the hub with: systemctl enable --now sth"
	exit 0
fi
if [ ! -d /run/systemd/system ]; then
	say "done, but systemd is not running here: start the hub yourself (docs/joining.md)"
	exit 0
fi
systemctl enable sth >/dev/null 2>&1
systemctl restart sth
# link.json appears once the manager has welcomed the hub (docs/link.md).
waited=0
while [ ! -s /var/lib/spacehub/link.json ]; do
	if [ "$waited" -ge 60 ]; then
		die "sth runs but has not joined after 60 s; see: journalctl -u sth"
	fi
	sleep 1
	waited=$((waited + 1))
done
say "joined: $(cat /var/lib/spacehub/link.json)"
