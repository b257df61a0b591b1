#!/bin/bash
# The short check of a scripts/vmtest.sh --smoke guest: ktproxy loads and
# attaches, curls over IPv4 and IPv6 in the intercepted cgroup are redirected
# through it, the client's getpeername() shows the original peer, and SIGTERM
# detaches everything and exits 0. The last line says what passed or failed.
set -u
bin=$(cat /vmtest/bin)
tmp=$(mktemp -d)
cg=/sys/fs/cgroup/vmtest-smoke
mkdir -p "$cg"

fail() {
	echo "--- ktproxy log"
	cat "$tmp/ktproxy.log" 2>/dev/null
	echo "smoke: FAILED: $*"
	exit 1
}
# wait_for FILE REGEX SECONDS [PID]: gives up early if PID exits.
wait_for() {
	local i
	for ((i = 0; i < $3 * 10; i++)); do
		grep -q -- "$2" "$1" 2>/dev/null && return 0
		[[ -z ${4:-} ]] || kill -0 "$4" 2>/dev/null || break
		sleep 0.1
	done
	grep -q -- "$2" "$1" 2>/dev/null
}
# in_cgroup COMMAND...: runs COMMAND as a member of the intercepted cgroup.
in_cgroup() {
	sh -c 'echo $$ >"$0/cgroup.procs" && exec "$@"' "$cg" "$@"
}

# testserver ADDR: starts one, prints the address it listens on.
testserver() {
	local log=$tmp/server-$RANDOM.log
	"$bin/testserver" -l "$1" >"$log" 2>&1 &
	wait_for "$log" '^testserver listening on ' 20 || fail "testserver -l $1 did not start"
	sed -n 's/^testserver listening on //p' "$log"
}
server=$(testserver 127.0.0.1:0)
server6=$(testserver '[::1]:0')
[[ -n $server && -n $server6 ]] || fail "testserver did not start"

start=$(date +%s.%N)
"$bin/ktproxy" -c "$cg" -l 127.0.0.1:0 -l '[::1]:0' >"$tmp/ktproxy.log" 2>&1 &
kt=$!
wait_for "$tmp/ktproxy.log" ready 60 "$kt" || fail "ktproxy exited, or was not ready within 60 s"
ready=$(python3 -c "print(round($(date +%s.%N) - $start, 2))")
echo "ready after $ready s"
bpftool cgroup show "$cg"
n=$(bpftool cgroup show "$cg" | grep -c ktproxy_)
[[ $n -eq 5 ]] || fail "$n ktproxy programs attached to $cg, expected 5"

body=$(in_cgroup curl -sS --max-time 20 "http://$server/") || fail "curl failed"
echo "curl: $body"
[[ $body == *"testserver at $server,"* ]] || fail "reply does not name $server: $body"
wait_for "$tmp/ktproxy.log" "Proxy connection established, .* to $server" 5 ||
	fail "curl reached the server, but not through ktproxy"

body=$(in_cgroup curl -sS -g --max-time 20 "http://$server6/") || fail "curl over IPv6 failed"
echo "curl: $body"
[[ $body == *"testserver at $server6,"* ]] || fail "reply does not name $server6: $body"
wait_for "$tmp/ktproxy.log" "Proxy connection established, .* to \\[::1\\]:${server6##*:}\$" 5 ||
	fail "curl reached $server6, but not through ktproxy"

host=${server%:*}
port=${server##*:}
peer=$(in_cgroup python3 -c '
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)
print("%s:%d" % s.getpeername()[:2])' "$host" "$port") || fail "python client failed"
[[ $peer == "$server" ]] || fail "getpeername() says $peer, not $server"
echo "getpeername: $peer"

kill -TERM "$kt"
wait "$kt"
rc=$?
[[ $rc -eq 0 ]] || fail "ktproxy exited $rc on SIGTERM"
n=$(bpftool cgroup show "$cg" | grep -c ktproxy_)
[[ $n -eq 0 ]] || fail "$n programs still attached after SIGTERM"
cat "$tmp/ktproxy.log"
echo "smoke: ready in $ready s, curl redirected (IPv4, IPv6), getpeername rewritten, SIGTERM clean"
