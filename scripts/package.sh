#!/usr/bin/env bash
# Builds the Debian package, target/debian/ktproxy_<version>_<arch>.deb:
#
#   scripts/package.sh [--out DIR]
#
# It holds /usr/sbin/ktproxy (stripped), the man page ktproxy(8), the
# systemd units ktproxy.service and proxied.slice with their start helper
# /usr/libexec/ktproxy/ktproxy-cgroup, the conffile /etc/default/ktproxy,
# and README and LICENSE under /usr/share/doc/ktproxy. The test helpers
# (testserver, testclient) stay out. Depends comes from dpkg-shlibdeps.
# Their sources are in scripts/deb/. Prints the package's path on stdout.
#
# A hand-made dpkg-deb tree rather than cargo-deb: every tool used here
# (dpkg-deb, dpkg-shlibdeps, strip, gzip) is a Debian package, where
# cargo-deb would have to be compiled with `cargo install` first.
#
# Environment: KTPROXY_BIN packages that binary instead of building one
# (the tests pass the one they built); DEBFULLNAME and DEBEMAIL name the
# maintainer, as for dch. Runs as any user; as root, when it builds, it
# installs what is missing (scripts/deps.sh).
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
deb=$root/scripts/deb
out=${CARGO_TARGET_DIR:-$root/target}/debian
while [[ $# -gt 0 ]]; do
	case $1 in
	--out)
		[[ $# -ge 2 ]] || {
			echo "package.sh: --out needs a directory" >&2
			exit 2
		}
		out=$2
		shift 2
		;;
	-h | --help)
		usage
		exit 0
		;;
	*)
		echo "package.sh: unknown argument '$1' (see --help)" >&2
		exit 2
		;;
	esac
done

say() { echo "package.sh: $*" >&2; }
die() {
	say "error: $*"
	exit 1
}

bin=${KTPROXY_BIN:-}
# Building needs the toolchain too; as root, install what is missing.
if [[ -z $bin && $EUID -eq 0 ]]; then
	"$root/scripts/deps.sh"
fi
for tool in dpkg-deb dpkg-shlibdeps strip gzip; do
	command -v "$tool" >/dev/null ||
		die "$tool is missing: run scripts/deps.sh as root (it installs dpkg-dev and binutils)"
done

if [[ -z $bin ]]; then
	command -v cargo >/dev/null || PATH="$PATH:$HOME/.cargo/bin"
	say "building ktproxy (cargo build --release)"
	cargo build --release --quiet --manifest-path "$root/Cargo.toml" --bin ktproxy
	bin=${CARGO_TARGET_DIR:-$root/target}/release/ktproxy
fi
[[ -x $bin ]] || die "no ktproxy binary at $bin"

# The binary says its own version: the package cannot disagree with it.
version=$("$bin" --version | sed -n 's/^ktproxy \([0-9][0-9A-Za-z.+~-]*\)$/\1/p')
[[ -n $version ]] || die "$bin --version did not print 'ktproxy VERSION'"
arch=$(dpkg --print-architecture)
# .invalid (RFC 2606): unless told, there is no address to write to.
maintainer="${DEBFULLNAME:-ktproxy developers} <${DEBEMAIL:-ktproxy@packages.invalid}>"
name=ktproxy_${version}_${arch}.deb

mkdir -p "$out"
work=$(mktemp -d "$out/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
# dpkg-shlibdeps wants the package tree at debian/<package>, with its
# DEBIAN directory, next to a debian/control.
pkg=$work/debian/ktproxy
mkdir -p "$pkg/DEBIAN"
printf 'Source: ktproxy\n\nPackage: ktproxy\nArchitecture: any\n' >"$work/debian/control"

# Files are root's and not group- or world-writable, whoever builds.
umask 022
install -D -m 0755 "$bin" "$pkg/usr/sbin/ktproxy"
# Debug information is most of the 10 MB (Cargo.toml keeps it for perf).
strip --remove-section=.comment --remove-section=.note --strip-unneeded "$pkg/usr/sbin/ktproxy"
install -D -m 0755 "$deb/ktproxy-cgroup" "$pkg/usr/libexec/ktproxy/ktproxy-cgroup"
install -D -m 0644 "$deb/ktproxy.service" "$pkg/usr/lib/systemd/system/ktproxy.service"
install -D -m 0644 "$deb/proxied.slice" "$pkg/usr/lib/systemd/system/proxied.slice"
install -D -m 0644 "$deb/ktproxy.default" "$pkg/etc/default/ktproxy"

date=$(date -u -d "@${SOURCE_DATE_EPOCH:-$(git -C "$root" log -1 --format=%ct 2>/dev/null || date +%s)}" +%F)
man=$pkg/usr/share/man/man8
mkdir -p "$man"
sed "s/^\.TH KTPROXY 8 .*/.TH KTPROXY 8 $date \"ktproxy $version\" \"System Administration\"/" \
	"$deb/ktproxy.8" | gzip -9n >"$man/ktproxy.8.gz"

doc=$pkg/usr/share/doc/ktproxy
mkdir -p "$doc"
gzip -9n <"$root/README.md" >"$doc/README.md.gz"
install -m 0644 "$root/LICENSE" "$doc/LICENSE"
{
	echo "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/"
	echo "Upstream-Name: ktproxy"
	echo
	echo "Files: *"
	echo "License: MIT"
	sed 's/^$/./; s/^/ /' "$root/LICENSE"
} >"$doc/copyright"
printf 'ktproxy (%s) unstable; urgency=medium\n\n  * Built by scripts/package.sh.\n\n -- %s  %s\n' \
	"$version" "$maintainer" "$(date -u -R -d "$date")" | gzip -9n >"$doc/changelog.gz"

depends=$(cd "$work" && dpkg-shlibdeps -O debian/ktproxy/usr/sbin/ktproxy | sed -n 's/^shlibs:Depends=//p')
[[ -n $depends ]] || die "dpkg-shlibdeps found no dependencies for ktproxy"

for s in postinst prerm postrm; do
	install -m 0755 "$deb/$s" "$pkg/DEBIAN/$s"
done
echo /etc/default/ktproxy >"$pkg/DEBIAN/conffiles"
(cd "$pkg" && find usr -type f -print0 | sort -z | xargs -0 md5sum) >"$pkg/DEBIAN/md5sums"
size=$(du -sk --exclude=DEBIAN "$pkg" | cut -f1)
cat >"$pkg/DEBIAN/control" <<EOF
Package: ktproxy
Version: $version
Architecture: $arch
Maintainer: $maintainer
Installed-Size: $size
Depends: $depends
Suggests: bpftool
Section: net
Priority: optional
Description: transparent TCP proxy for the processes of a cgroup, with eBPF
 eBPF programs catch connect() in the kernel and redirect it to ktproxy,
 which dials the original destination, directly or through a SOCKS5 or
 HTTP proxy, and relays the bytes with splice(2). Applications need no
 proxy settings: static binaries are covered too.
 .
 ktproxy.service proxies the services that join proxied.slice
 (Slice=proxied.slice); ktproxy -- COMMAND pushes one command through a
 proxy. Needs Linux >= 5.14 with cgroup v2.
EOF

dpkg-deb --root-owner-group -Zxz --build "$pkg" "$out/$name" >/dev/null
say "built $out/$name ($(du -k "$out/$name" | cut -f1) KiB; Depends: $depends)"
echo "$out/$name"
