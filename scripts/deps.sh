#!/usr/bin/env bash
# Installs what building and testing ktproxy needs, if it is missing.
# Safe to run again: it touches nothing when everything is already there.
#
#   KTPROXY_INSTALL_RUST=1  also install Rust with rustup when cargo is absent
set -euo pipefail

# gcc is not in the usual list but is needed: rustc links through `cc`.
# The second line: real peers the end-to-end tests talk to (SOCKS5 and HTTP
# CONNECT proxies, a statically linked wget and nslookup, dig). The third: the
# man page check (groff), the Debian package (scripts/package.sh:
# dpkg-shlibdeps), the security tests' firewall rules (nft) and `ps` as
# another user.
debian_pkgs=(clang llvm gcc libc6-dev make pkg-config libelf-dev zlib1g-dev
	linux-libc-dev curl ca-certificates netcat-openbsd iproute2 python3
	microsocks tinyproxy busybox-static dnsutils
	groff-base dpkg-dev nftables procps)
fedora_pkgs=(clang llvm gcc make pkgconf-pkg-config elfutils-libelf-devel
	zlib-devel kernel-headers bpftool curl nmap-ncat iproute python3
	microsocks tinyproxy busybox bind-utils
	groff-base nftables procps-ng)

say() { echo "deps.sh: $*" >&2; }

need_root() {
	if [[ $EUID -ne 0 ]]; then
		say "missing: $*"
		say "run as root to install them, or install them yourself"
		exit 1
	fi
}

# Ubuntu's bpftool is a wrapper that exists even when the kernel-specific
# tools behind it are missing, so ask it to run rather than look it up.
# Non-root PATHs often lack /usr/sbin, where it lives.
have_bpftool() {
	bpftool version >/dev/null 2>&1 || /usr/sbin/bpftool version >/dev/null 2>&1
}

install_debian() {
	local missing=() p
	for p in "${debian_pkgs[@]}"; do
		[[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) == 'install ok installed' ]] ||
			missing+=("$p")
	done
	local want_bpftool=0 wanted=("${missing[@]}")
	if ! have_bpftool; then
		want_bpftool=1
		wanted+=(bpftool)
	fi
	if [[ ${#wanted[@]} -eq 0 ]]; then
		return 0
	fi
	need_root "${wanted[@]}"
	say "installing: ${wanted[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq >/dev/null
	if [[ ${#missing[@]} -gt 0 ]]; then
		apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
	fi
	if [[ $want_bpftool -eq 1 ]]; then
		# Debian ships bpftool on its own; Ubuntu only inside linux-tools.
		apt-get install -y -qq --no-install-recommends bpftool >/dev/null 2>&1 ||
			apt-get install -y -qq --no-install-recommends linux-tools-common \
				"linux-tools-$(uname -r)" >/dev/null 2>&1 ||
			say "warning: could not install bpftool (only needed to inspect BPF state)"
	fi
}

install_fedora() {
	local missing=() p
	for p in "${fedora_pkgs[@]}"; do
		rpm -q --quiet "$p" || missing+=("$p")
	done
	if [[ ${#missing[@]} -eq 0 ]]; then
		return 0
	fi
	need_root "${missing[@]}"
	say "installing: ${missing[*]}"
	dnf install -y -q "${missing[@]}" >/dev/null
}

ensure_rust() {
	# sudo resets PATH, so a rustup install in this $HOME may not be on it.
	if ! command -v cargo >/dev/null && [[ -x $HOME/.cargo/bin/cargo ]]; then
		PATH="$PATH:$HOME/.cargo/bin"
	fi
	if ! command -v cargo >/dev/null; then
		if [[ ${KTPROXY_INSTALL_RUST:-0} != 1 ]]; then
			say "cargo not found (looked in PATH and $HOME/.cargo/bin)"
			say "install Rust from https://rustup.rs, or rerun with KTPROXY_INSTALL_RUST=1"
			exit 1
		fi
		say "installing Rust with rustup into $HOME"
		curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs |
			sh -s -- -y -q --profile minimal -c rustfmt,clippy >/dev/null
		PATH="$PATH:$HOME/.cargo/bin"
	fi
	if ! command -v rustup >/dev/null; then
		# A distribution's Rust: components are packages we cannot name here.
		cargo fmt --version >/dev/null 2>&1 || say "warning: cargo fmt is missing (install rustfmt)"
		cargo clippy --version >/dev/null 2>&1 || say "warning: cargo clippy is missing (install clippy)"
		return 0
	fi
	local installed c
	installed=$(rustup component list --installed 2>/dev/null)
	for c in rustfmt clippy; do
		if ! grep -q "^$c" <<<"$installed"; then
			say "adding rustup component $c"
			rustup component add "$c" >/dev/null
		fi
	done
}

if command -v apt-get >/dev/null && command -v dpkg-query >/dev/null; then
	install_debian
elif command -v dnf >/dev/null && command -v rpm >/dev/null; then
	install_fedora
else
	say "warning: unknown package manager; make sure these (Debian names) are installed:"
	say "  ${debian_pkgs[*]} bpftool"
fi
ensure_rust
