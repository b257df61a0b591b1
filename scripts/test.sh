#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit and end-to-end tests, then a
# real curl through a real ktproxy. Needs root: the tests load BPF programs.
#   sudo scripts/test.sh
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ $EUID -ne 0 ]]; then
	echo "test.sh: the tests load BPF programs and must run as root: sudo $0" >&2
	exit 1
fi
scripts/deps.sh
# deps.sh may have found cargo only in $HOME/.cargo/bin (sudo resets PATH).
command -v cargo >/dev/null || PATH="$PATH:$HOME/.cargo/bin"
bin=${CARGO_TARGET_DIR:-target}/release

failures=0
pass() { echo "PASS: $*"; }
fail() {
	echo "FAIL: $*"
	failures=$((failures + 1))
}
# step NAME COMMAND...: runs COMMAND and records the outcome under NAME.
step() {
	local name=$1
	shift
	if "$@"; then pass "$name"; else fail "$name"; fi
}

# State of the curl check, for cleanup: what it started and created.
pids=()
cgroup=
tmp=

cleanup() {
	local pid i alive
	for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
	for ((i = 0; i < 20; i++)); do
		alive=0
		for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
		[[ $alive -eq 1 ]] || break
		sleep 0.1
	done
	for pid in "${pids[@]}"; do
		kill -KILL "$pid" 2>/dev/null || true
		wait "$pid" 2>/dev/null || true
	done
	pids=()
	if [[ -n $cgroup ]]; then
		# The kernel notices the last member's exit a little after wait().
		for ((i = 0; i < 20; i++)); do
			rmdir "$cgroup" 2>/dev/null && break
			sleep 0.1
		done
		[[ -d $cgroup ]] && echo "test.sh: warning: could not remove $cgroup" >&2
		cgroup=
	fi
	[[ -n $tmp ]] && rm -rf "$tmp"
	tmp=
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Mount point (field 5) of the first cgroup2 mount; the filesystem type is
# the field after the " - " separator, as optional fields vary in number.
cgroup2_root() {
	awk '{
		for (i = 7; i <= NF; i++) if ($i == "-") break
		if ($(i + 1) == "cgroup2") { print $5; exit }
	}' /proc/self/mountinfo
}

# A loopback port nobody listens on right now.
free_port() {
	python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_for FILE REGEX PID SECONDS: until FILE has a line matching REGEX;
# gives up early if PID exits.
wait_for() {
	local i
	for ((i = 0; i < $4 * 10; i++)); do
		grep -q -- "$2" "$1" 2>/dev/null && return 0
		kill -0 "$3" 2>/dev/null || break
		sleep 0.1
	done
	grep -q -- "$2" "$1" 2>/dev/null
}

# Runs as an `if` condition, where set -e is off: every step checks itself.
curl_check() {
	local cg_root server proxy_port body
	cg_root=$(cgroup2_root)
	if [[ -z $cg_root ]]; then
		echo "no cgroup2 mount in /proc/self/mountinfo"
		return 1
	fi
	tmp=$(mktemp -d) || return 1
	mkdir "$cg_root/ktproxy-curl-$$" || return 1
	cgroup=$cg_root/ktproxy-curl-$$

	"$bin/testserver" -l 127.0.0.1:0 >"$tmp/server.log" 2>&1 &
	pids+=($!)
	if ! wait_for "$tmp/server.log" '^testserver listening on ' "$!" 10; then
		echo "testserver did not start:"
		cat "$tmp/server.log"
		return 1
	fi
	server=$(sed -n 's/^testserver listening on //p' "$tmp/server.log")

	proxy_port=$(free_port) || return 1
	"$bin/ktproxy" -c "$cgroup" -l "127.0.0.1:$proxy_port" >"$tmp/ktproxy.log" 2>&1 &
	pids+=($!)
	if ! wait_for "$tmp/ktproxy.log" ready "$!" 10; then
		echo "ktproxy exited, or did not report ready within 10 s:"
		cat "$tmp/ktproxy.log"
		return 1
	fi

	# Only this subshell joins the cgroup; exec makes curl that very process.
	if ! body=$(
		echo "$BASHPID" >"$cgroup/cgroup.procs" || exit 1
		exec curl -sS --max-time 5 "http://$server/"
	); then
		echo "curl failed; ktproxy log:"
		cat "$tmp/ktproxy.log"
		return 1
	fi
	if [[ $body != *"testserver at $server,"* ]]; then
		echo "reply does not name $server: $body"
		return 1
	fi
	if ! wait_for "$tmp/ktproxy.log" 'Proxy connection established' "${pids[-1]}" 2; then
		echo "curl reached the server, but not through ktproxy; its log:"
		cat "$tmp/ktproxy.log"
		return 1
	fi
}

# The man page is clean roff: groff -ww prints every warning; man(1), where
# installed, adds its own checks (preconv, tbl).
man_page_check() {
	local page=scripts/deb/ktproxy.8 out
	out=$(groff -man -ww -z "$page" 2>&1) && [[ -z $out ]] || {
		echo "groff -man -ww -z $page: ${out:-failed}"
		return 1
	}
	command -v man >/dev/null || return 0
	out=$(LC_ALL=C.UTF-8 MANWIDTH=80 man --warnings -l "$page" 2>&1 >/dev/null) && [[ -z $out ]] || {
		echo "man --warnings -l $page: ${out:-failed}"
		return 1
	}
}

# The systemd units as the package installs them (the start helper from
# scripts/deb/ in place of /usr/libexec/ktproxy/), where systemd is here.
# systemd-analyze verify exits 0 on unknown keys and bad values: any output
# is a failure.
units_check() {
	if ! command -v systemd-analyze >/dev/null; then
		echo "SKIP: systemd-analyze verify: systemd is not installed"
		return 0
	fi
	local dir out rc=0 man=yes
	dir=$(mktemp -d) || return 1
	mkdir -p "$dir/man/man8"
	cp scripts/deb/ktproxy.8 "$dir/man/man8/"
	cp scripts/deb/proxied.slice "$dir/"
	sed "s|/usr/libexec/ktproxy/ktproxy-cgroup|$PWD/scripts/deb/ktproxy-cgroup|" \
		scripts/deb/ktproxy.service >"$dir/ktproxy.service"
	command -v man >/dev/null || man=no
	out=$(MANPATH=$dir/man systemd-analyze verify --man=$man \
		"$dir/ktproxy.service" "$dir/proxied.slice" 2>&1) && [[ -z $out ]] || {
		echo "systemd-analyze verify: ${out:-failed}"
		rc=1
	}
	rm -rf "$dir"
	return $rc
}

step "cargo fmt --check" cargo fmt --check
step "cargo clippy" cargo clippy --all-targets --quiet -- -D warnings
if ! cargo build --release --quiet; then
	fail "cargo build --release"
	echo "FAIL: $failures check(s) failed"
	exit 1
fi
pass "cargo build --release"
step "cargo test --release" cargo test --release
step "curl through ktproxy" curl_check
step "man page (groff -ww)" man_page_check
step "systemd units (systemd-analyze verify)" units_check
cleanup
if [[ -x scripts/bench.sh ]]; then
	step "bench smoke" scripts/bench.sh --smoke
fi

if [[ $failures -gt 0 ]]; then
	echo "FAIL: $failures check(s) failed"
	exit 1
fi
echo "PASS: all checks"
