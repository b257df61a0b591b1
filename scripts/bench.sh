#!/usr/bin/env bash
# Benchmarks ktproxy against direct connections and haproxy, side by side:
#
#   sudo scripts/bench.sh [--quick] [--smoke] [--no-haproxy]
#
#   (default)     3 runs of everything, medians; iperf3 and wrk 5 s each,
#                 5000 idle connections. About 4 minutes on 2 vCPUs.
#   --quick       1 run; iperf3 2 s, wrk 3 s, 1000 idle connections (~45 s)
#   --smoke       ~1 s of each workload, 50 idle connections, no haproxy, no
#                 installs: a row whose tool is missing prints SKIP. Exits
#                 non-zero when ktproxy fails to proxy (scripts/test.sh runs it).
#   --no-haproxy  leave out the haproxy reference column
#
# Every workload runs these ways: direct (the client in the benchmark cgroup,
# ktproxy not running), ktproxy (client in the cgroup, ktproxy -q -c cgroup)
# and haproxy (mode tcp, nbthread 2; the client dials haproxy's port). The
# Markdown table comes last, on stdout; progress and raw tool lines go to
# stderr. Everything stays on 127.0.0.1; every step is bounded in time.
#
# Start-up (ktproxy only): spawn to ready line, without rules and with
# 10,000 --exclude-file CIDRs.
#
# DNS (ktproxy only, with --proxy-dns): `testclient dns-bench` in the cgroup
# asks 127.0.0.153:53 (redirected to ktproxy's responder): A latency for a
# cached name, queries/s with one responder thread, and the responder's
# memory per name over 100,000 distinct names (2,000 with --smoke).
#
# Environment: KTPROXY_ARGS adds options to ktproxy's command line (e.g.
# "-p 80,8000-9000"); BENCH_KEEP=1 keeps the temporary directory (configs, logs, raw
# tool output) and prints its path.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

quick=0 smoke=0 use_haproxy=1
for arg in "$@"; do
	case $arg in
	--quick) quick=1 ;;
	--smoke) smoke=1 ;;
	--no-haproxy) use_haproxy=0 ;;
	-h | --help)
		usage
		exit 0
		;;
	*)
		echo "bench.sh: unknown argument '$arg'" >&2
		usage >&2
		exit 2
		;;
	esac
done

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
here=$root/scripts/bench
if [[ $EUID -ne 0 ]]; then
	echo "bench.sh: loads BPF programs and creates a cgroup, so it must run as root: sudo $0 $*" >&2
	exit 1
fi
# sudo's PATH may lack sbin (nginx, haproxy, bpftool) and ~/.cargo/bin.
PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

if ((smoke)); then
	runs=1 iperf_t=1 wrk_d=1 idle_n=50 idle_deadline=10 use_haproxy=0 dns_t=1 dns_names=2000
elif ((quick)); then
	runs=1 iperf_t=2 wrk_d=3 idle_n=1000 idle_deadline=30 dns_t=2 dns_names=100000
else
	runs=3 iperf_t=5 wrk_d=5 idle_n=5000 idle_deadline=60 dns_t=3 dns_names=100000
fi

log() { echo "bench: [${SECONDS}s] $*" >&2; }
die() {
	log "error: $*"
	exit 1
}

# ---- state, and the cleanup that undoes all of it ---------------------------

pids=()      # every background process we started
cg=          # the benchmark cgroup
tmp=         # temporary directory
bpf_stats_old=
policy_created=0
problems=()  # failures that make the exit status non-zero
warnings=()  # reported at the end, do not change the exit status

restore_bpf_stats() {
	if [[ -n $bpf_stats_old ]]; then
		echo "$bpf_stats_old" >/proc/sys/kernel/bpf_stats_enabled 2>/dev/null || true
	fi
}

# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
	local pid i alive
	set +e
	for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null; done
	for ((i = 0; i < 50; i++)); do
		alive=0
		for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
		((alive)) || break
		sleep 0.1
	done
	for pid in "${pids[@]}"; do
		kill -KILL "$pid" 2>/dev/null
		wait "$pid" 2>/dev/null
	done
	pids=()
	restore_bpf_stats
	if [[ -n $cg && -d $cg ]]; then
		# Only our clients (and their children) ever join this cgroup: any
		# member left is one of ours that outlived its parent.
		while read -r pid; do kill -TERM "$pid" 2>/dev/null; done <"$cg/cgroup.procs"
		sleep 0.2
		while read -r pid; do kill -KILL "$pid" 2>/dev/null; done <"$cg/cgroup.procs"
		# The kernel notices the last member's exit a little after wait().
		for ((i = 0; i < 50; i++)); do
			rmdir "$cg" 2>/dev/null && break
			sleep 0.1
		done
		[[ -d $cg ]] && log "warning: could not remove $cg"
	fi
	if ((policy_created)); then
		rm -f /usr/sbin/policy-rc.d
		policy_created=0
	fi
	if [[ -n $tmp && -d $tmp ]]; then
		if [[ ${BENCH_KEEP:-0} == 1 ]]; then
			log "kept $tmp"
		else
			rm -rf "$tmp"
		fi
	fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

set_bpf_stats_on() {
	[[ -w /proc/sys/kernel/bpf_stats_enabled ]] || return 0
	[[ -n $bpf_stats_old ]] || bpf_stats_old=$(</proc/sys/kernel/bpf_stats_enabled)
	echo 1 >/proc/sys/kernel/bpf_stats_enabled
}

# stop_pid PID [SECONDS]: SIGTERM, then SIGKILL after SECONDS (default 5).
stop_pid() {
	local pid=$1 limit=${2:-5} i p rest=()
	kill -TERM "$pid" 2>/dev/null || true
	for ((i = 0; i < limit * 10; i++)); do
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.1
	done
	kill -KILL "$pid" 2>/dev/null || true
	wait "$pid" 2>/dev/null || true
	for p in "${pids[@]}"; do [[ $p == "$pid" ]] || rest+=("$p"); done
	pids=("${rest[@]}")
}

# ---- tools ------------------------------------------------------------------

have() { command -v "$1" >/dev/null 2>&1; }
have_bpftool() { bpftool version >/dev/null 2>&1; }

install_missing() {
	local want=() c
	have python3 || want+=(python3)
	have nginx || want+=(nginx)
	have wrk || want+=(wrk)
	have iperf3 || want+=(iperf3)
	have_bpftool || want+=(bpftool)
	((use_haproxy)) && ! have haproxy && want+=(haproxy)
	[[ ${#want[@]} -eq 0 ]] && return 0
	if ! have apt-get; then
		log "missing ${want[*]} and no apt-get: install them yourself"
		return 0
	fi
	log "installing: ${want[*]}"
	export DEBIAN_FRONTEND=noninteractive
	# Keep the packages' own services (nginx on :80, haproxy) from starting.
	if [[ ! -e /usr/sbin/policy-rc.d ]]; then
		printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
		chmod 755 /usr/sbin/policy-rc.d
		policy_created=1
	fi
	apt-get update -qq >/dev/null || log "warning: apt-get update failed"
	for c in "${want[@]}"; do
		case $c in
		nginx)
			apt-get install -y -qq --no-install-recommends nginx-light >/dev/null 2>&1 ||
				apt-get install -y -qq --no-install-recommends nginx >/dev/null 2>&1 ||
				log "warning: could not install nginx"
			;;
		*)
			apt-get install -y -qq --no-install-recommends "$c" >/dev/null 2>&1 ||
				log "warning: could not install $c"
			;;
		esac
	done
	if ((policy_created)); then
		rm -f /usr/sbin/policy-rc.d
		policy_created=0
	fi
}

((smoke)) || install_missing

if ! have python3; then
	if ((smoke)); then
		echo "SKIP: bench smoke: python3 is not installed"
		exit 0
	fi
	die "python3 is needed"
fi
# The interpreter itself, not a wrapper (pyenv's shims fork, and cost 0.1 s
# each): the idle client must be the very process we later signal.
py=$(python3 -c 'import sys; print(sys.executable)')
skip_wrk=0 skip_iperf=0 skip_bpf=0
if ! have wrk || ! have nginx; then
	((smoke)) || die "wrk and nginx are needed"
	skip_wrk=1
fi
if ! have iperf3; then
	((smoke)) || die "iperf3 is needed"
	skip_iperf=1
fi
if ! have_bpftool; then
	((smoke)) || die "bpftool is needed"
	skip_bpf=1
fi
if ((use_haproxy)) && ! have haproxy; then
	warnings+=("haproxy is not installed: no haproxy column")
	use_haproxy=0
fi

# ---- cgroup, temp dir, backends -------------------------------------------------

# Mount point (field 5) of the first cgroup2 mount; the filesystem type is
# the field after the " - " separator, as optional fields vary in number.
cg_root=$(awk '{
	for (i = 7; i <= NF; i++) if ($i == "-") break
	if ($(i + 1) == "cgroup2") { print $5; exit }
}' /proc/self/mountinfo)
[[ -n $cg_root && -d $cg_root ]] || die "no cgroup2 mount in /proc/self/mountinfo"
tmp=$(mktemp -d /tmp/ktproxy-bench.XXXXXX)
mkdir "$cg_root/ktproxy-bench-$$"
cg=$cg_root/ktproxy-bench-$$
[[ $cg != "$cg_root" && $cg != "$cg_root/" ]] || die "refusing to use the cgroup root"

# ---- build --------------------------------------------------------------------

have cargo || PATH="$PATH:$HOME/.cargo/bin"
log "building ktproxy (cargo build --release)"
if ! cargo build --release --quiet --manifest-path "$root/Cargo.toml" --bin ktproxy --bin testclient >"$tmp/build.log" 2>&1; then
	cat "$tmp/build.log" >&2
	die "cargo build --release failed"
fi
ktproxy=${CARGO_TARGET_DIR:-$root/target}/release/ktproxy
[[ -x $ktproxy ]] || die "no $ktproxy after the build"
testclient=${CARGO_TARGET_DIR:-$root/target}/release/testclient

# in_cg CMD...: runs CMD as a member of the benchmark cgroup (only this
# subshell joins it; exec makes CMD that very process).
in_cg() {
	(
		echo "$BASHPID" >"$cg/cgroup.procs" || exit 125
		exec "$@"
	)
}
# bg_in_cg CMD... &: the same in the background, so that $! is CMD itself
# (a function run with & is already a subshell of its own: exec that one).
bg_in_cg() {
	echo "$BASHPID" >"$cg/cgroup.procs" || exit 125
	exec "$@"
}

read -r nginx_port iperf_port holder_port kt_port hp_http hp_iperf hp_holder \
	<<<"$("$py" "$here/tool.py" free-ports 7)"

# wait_port PORT PID SECONDS: until something listens on 127.0.0.1:PORT.
wait_port() {
	local i
	for ((i = 0; i < $3 * 10; i++)); do
		ss -Hltn "sport = :$1" 2>/dev/null | grep -q . && return 0
		kill -0 "$2" 2>/dev/null || return 1
		sleep 0.1
	done
	return 1
}

fd_count() { find "/proc/$1/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l; }
sock_count() { find "/proc/$1/fd" -lname 'socket:*' 2>/dev/null | wc -l; }

clk_tck=$(getconf CLK_TCK)
# cpu_ticks PID: utime+stime of the whole process (exited threads included).
cpu_ticks() {
	local stat rest f
	[[ -n $1 ]] || {
		echo 0
		return
	}
	stat=$(<"/proc/$1/stat") || {
		echo 0
		return
	}
	rest=${stat##*) }
	read -ra f <<<"$rest"
	echo $((f[11] + f[12]))
}

# kworker_ticks: utime+stime of every kernel worker thread, summed: work the
# kernel does for a mode outside its own threads (direct shows what the
# machine does anyway).
kworker_ticks() {
	local f stat a total=0
	for f in /proc/[0-9]*/stat; do
		read -r stat 2>/dev/null <"$f" || continue
		[[ $stat == *"(kworker"* ]] || continue
		read -ra a <<<"${stat##*) }"
		total=$((total + a[11] + a[12]))
	done
	echo "$total"
}

# proxied MODE RUN WHAT C0 C1: fails the run when MODE is ktproxy's and the
# workload did not go through it (it used no CPU).
proxied() {
	local mode=$1 run=$2 what=$3
	[[ -n $proxy_pid ]] || return 0
	if (($5 == $4)); then
		fail_or_warn "$mode" "run $run: $mode used no CPU during $what: was it proxied?"
	fi
}

if ! ((skip_wrk)); then
	mkdir -p "$tmp/nginx"
	cat >"$tmp/nginx/nginx.conf" <<EOF
# One single-process nginx: on a 2-vCPU box the other core is left to the
# client and the proxy, and no master/worker pair to stop.
worker_processes 1;
master_process off;
daemon off;
pid $tmp/nginx/nginx.pid;
error_log $tmp/nginx/error.log warn;
worker_rlimit_nofile 16384;
events { worker_connections 8192; }
http {
	access_log off;
	keepalive_requests 1000000;
	keepalive_timeout 60s;
	server {
		listen 127.0.0.1:$nginx_port backlog=4096;
		location / { return 200 "ok\n"; }
	}
}
EOF
	nginx -p "$tmp/nginx" -c "$tmp/nginx/nginx.conf" -e "$tmp/nginx/error.log" >"$tmp/nginx/out.log" 2>&1 &
	pids+=($!)
	wait_port "$nginx_port" "$!" 10 || {
		cat "$tmp/nginx/out.log" "$tmp/nginx/error.log" >&2 2>/dev/null
		die "nginx did not start"
	}
fi
if ! ((skip_iperf)); then
	iperf3 -s -B 127.0.0.1 -p "$iperf_port" >"$tmp/iperf3-server.log" 2>&1 &
	pids+=($!)
	wait_port "$iperf_port" "$!" 10 || die "iperf3 -s did not start"
fi
"$py" "$here/holder.py" server "$holder_port" >"$tmp/holder-server.log" 2>&1 &
holder_pid=$!
pids+=("$holder_pid")
wait_port "$holder_port" "$holder_pid" 10 || die "holder server did not start"
holder_fds0=$(fd_count "$holder_pid")

if ((use_haproxy)); then
	# nbthread 2: one thread per vCPU, as ktproxy may use both cores too.
	# Default forwarding (no splice options): haproxy as usually deployed.
	cat >"$tmp/haproxy.cfg" <<EOF
global
	nbthread 2
	maxconn 9000
defaults
	mode tcp
	maxconn 9000
	timeout connect 5s
	timeout client 10m
	timeout server 10m
frontend http
	bind 127.0.0.1:$hp_http
	default_backend http
backend http
	server nginx 127.0.0.1:$nginx_port
frontend iperf
	bind 127.0.0.1:$hp_iperf
	default_backend iperf
backend iperf
	server iperf3 127.0.0.1:$iperf_port
frontend holder
	bind 127.0.0.1:$hp_holder
	default_backend holder
backend holder
	server holder 127.0.0.1:$holder_port
EOF
	if ! haproxy -c -f "$tmp/haproxy.cfg" >"$tmp/haproxy-check.log" 2>&1; then
		cat "$tmp/haproxy-check.log" >&2
		warnings+=("haproxy rejected its config: no haproxy column")
		use_haproxy=0
	fi
fi

modes=(direct ktproxy)
((use_haproxy)) && modes+=(haproxy)
# is_kt MODE: the mode runs ktproxy.
is_kt() { [[ $1 == ktproxy ]]; }

# ---- the proxy under test ---------------------------------------------------------

proxy_pid=
prog_ids=
proxy_extra=() # more ktproxy options for one phase (DNS)

# port_for MODE BACKEND_PORT HAPROXY_PORT
port_for() { if [[ $1 == haproxy ]]; then echo "$3"; else echo "$2"; fi; }

# start_proxy MODE RUN: sets proxy_pid ("" for direct).
start_proxy() {
	local mode=$1 run=$2 i
	proxy_pid=
	prog_ids=
	case $mode in
	direct)
		if ((!skip_bpf)) && bpftool cgroup show "$cg" effective 2>/dev/null | grep -q connect; then
			warnings+=("run $run: connect programs from elsewhere apply to $cg: 'direct' may be proxied")
		fi
		;;
	ktproxy)
		set_bpf_stats_on
		# shellcheck disable=SC2086 # KTPROXY_ARGS: words on purpose
		"$ktproxy" -q -c "$cg" -l "127.0.0.1:$kt_port" ${KTPROXY_ARGS:-} \
			"${proxy_extra[@]}" >"$tmp/ktproxy.log" 2>&1 &
		proxy_pid=$!
		pids+=("$proxy_pid")
		# With -q it prints nothing when ready: wait until connect4 is attached
		# (ktproxy attaches it last), or without bpftool for its listener.
		for ((i = 0; i < 100; i++)); do
			kill -0 "$proxy_pid" 2>/dev/null || break
			if ((skip_bpf)); then
				ss -Hltn "sport = :$kt_port" | grep -q . && sleep 0.5 && break
			elif bpftool cgroup show "$cg" 2>/dev/null | grep -q ktproxy_connect4; then
				break
			fi
			sleep 0.1
		done
		if ! kill -0 "$proxy_pid" 2>/dev/null || ((i == 100)); then
			cat "$tmp/ktproxy.log" >&2
			problems+=("run $run: ktproxy did not get ready within 10 s")
			stop_pid "$proxy_pid"
			proxy_pid=
			return 1
		fi
		prog_ids=$(cat /proc/"$proxy_pid"/fdinfo/* 2>/dev/null | awk '/^prog_id:/ {print $2}' | sort -un | paste -sd, -)
		;;
	haproxy)
		haproxy -db -f "$tmp/haproxy.cfg" >"$tmp/haproxy.log" 2>&1 &
		proxy_pid=$!
		pids+=("$proxy_pid")
		if ! wait_port "$hp_http" "$proxy_pid" 10 || ! wait_port "$hp_iperf" "$proxy_pid" 5 ||
			! wait_port "$hp_holder" "$proxy_pid" 5; then
			cat "$tmp/haproxy.log" >&2
			warnings+=("run $run: haproxy did not start")
			stop_pid "$proxy_pid"
			proxy_pid=
			return 1
		fi
		;;
	esac
}

stop_proxy() {
	local mode=$1 run=$2
	if [[ -n $proxy_pid ]]; then
		if ! kill -0 "$proxy_pid" 2>/dev/null; then
			is_kt "$mode" && problems+=("run $run: $mode died during the run") ||
				warnings+=("run $run: $mode died during the run")
			is_kt "$mode" && tail -20 "$tmp/ktproxy.log" >&2
		fi
		stop_pid "$proxy_pid" 10
	fi
	proxy_pid=
	is_kt "$mode" && restore_bpf_stats
	return 0
}

results=$tmp/results.tsv
: >"$results"
record() { echo "$1 $2 $3 $4" >>"$results"; } # RUN MODE METRIC VALUE
calc() { awk "BEGIN { printf \"%.4f\\n\", $1 }"; }
# fail_or_warn MODE MESSAGE: a failure of ktproxy (or, in smoke mode, of
# anything) fails the benchmark; haproxy's and direct's are reported.
fail_or_warn() {
	if is_kt "$1" || ((smoke)); then problems+=("$2"); else warnings+=("$2"); fi
}

# ---- workload 5: idle connections ------------------------------------------------

# mem_snap PID: "PSS_KIB FDS THREADS KERNEL_KIB" (proxy figures 0 without PID).
# The kernel figure is read first: listing /proc/PID/fd makes the kernel
# create a proc inode and dentry per descriptor (~0.9 KiB each), which would
# otherwise be charged to the proxy.
mem_snap() {
	local pid=$1 pss=0 fds=0 threads=0 kern
	kern=$(awk '/^(KernelStack|PageTables|SUnreclaim|SReclaimable):/ {s += $2} END {print s}' /proc/meminfo)
	if [[ -n $pid ]]; then
		pss=$(awk '/^Pss:/ {print $2}' "/proc/$pid/smaps_rollup")
		fds=$(fd_count "$pid")
		threads=$(awk '/^Threads:/ {print $2}' "/proc/$pid/status")
	fi
	echo "$pss $fds $threads $kern"
}

idle_test() {
	local run=$1 mode=$2 port pss0 fds0 thr0 kern0 pss1 fds1 thr1 kern1 cpid i line ok fail secs errs socks0=0
	port=$(port_for "$mode" "$holder_port" "$hp_holder")
	[[ -n $proxy_pid ]] && socks0=$(sock_count "$proxy_pid")
	read -r pss0 fds0 thr0 kern0 <<<"$(mem_snap "$proxy_pid")"
	bg_in_cg "$py" "$here/holder.py" client 127.0.0.1 "$port" "$idle_n" "$idle_deadline" \
		>"$tmp/idle-client.log" 2>&1 &
	cpid=$!
	pids+=("$cpid")
	line=
	for ((i = 0; i < (idle_deadline + 15) * 10; i++)); do
		line=$(grep -m1 '^READY ' "$tmp/idle-client.log" 2>/dev/null) && break
		kill -0 "$cpid" 2>/dev/null || break
		sleep 0.1
	done
	if [[ -z $line ]]; then
		cat "$tmp/idle-client.log" >&2
		stop_pid "$cpid"
		fail_or_warn "$mode" "run $run: $mode: idle client never reported"
		return 0
	fi
	sleep 1 # let the proxy finish setting up the last connections
	read -r pss1 fds1 thr1 kern1 <<<"$(mem_snap "$proxy_pid")"
	if [[ ! $line =~ ^READY\ ok=([0-9]+)\ fail=([0-9]+)\ secs=([0-9.]+)\ errors=(.*)$ ]]; then
		stop_pid "$cpid"
		fail_or_warn "$mode" "run $run: $mode: idle client said: $line"
		return 0
	fi
	ok=${BASH_REMATCH[1]} fail=${BASH_REMATCH[2]} secs=${BASH_REMATCH[3]} errs=${BASH_REMATCH[4]}
	stop_pid "$cpid"
	log "run $run $mode idle: $ok of $idle_n established in ${secs}s, $fail failed (errors: $errs)," \
		"proxy Pss ${pss0}->${pss1} KiB, fds $fds0->$fds1, threads $thr0->$thr1, kernel ${kern0}->${kern1} KiB"
	record "$run" "$mode" idle_failures "$fail"
	record "$run" "$mode" idle_secs "$secs"
	if ((ok > 0)); then
		record "$run" "$mode" idle_pss_raw_kib "$(calc "($pss1 - $pss0) / $ok")"
		record "$run" "$mode" idle_kern_raw_kib "$(calc "($kern1 - $kern0) / $ok")"
		if [[ -n $proxy_pid ]]; then
			record "$run" "$mode" idle_fds_per_conn "$(calc "($fds1 - $fds0) / $ok")"
			record "$run" "$mode" idle_threads "$thr1"
		fi
	fi
	if ((ok == 0)); then
		fail_or_warn "$mode" "run $run: $mode: no idle connection established ($errs)"
	elif ((fail > 0)); then
		fail_or_warn "$mode" "run $run: $mode: $fail of $idle_n idle connections failed ($errs)"
	fi
	if is_kt "$mode" && ((fds1 - fds0 < ok)); then
		problems+=("run $run: ktproxy holds $((fds1 - fds0)) more fds for $ok connections: were they proxied?")
	fi
	# Wait (bounded) until the proxy and the holder have let go of them all
	# (sockets only: the proxy may keep pipes for reuse).
	for ((i = 0; i < 200; i++)); do
		if (($(fd_count "$holder_pid") <= holder_fds0 + 2)) &&
			{ [[ -z $proxy_pid ]] || (($(sock_count "$proxy_pid") <= socks0)); }; then
			break
		fi
		sleep 0.1
	done
}

# ---- workload 1: iperf3 ---------------------------------------------------------------

run_iperf() {
	local run=$1 mode=$2 streams=$3 port out c0 c1 k0 k1 res gbps bytes
	port=$(port_for "$mode" "$iperf_port" "$hp_iperf")
	out=$tmp/iperf-$mode-$run-$streams.json
	c0=$(cpu_ticks "$proxy_pid") k0=$(kworker_ticks)
	in_cg timeout -k 5 $((iperf_t + 20)) iperf3 -c 127.0.0.1 -p "$port" -t "$iperf_t" -P "$streams" -J \
		>"$out" 2>"$out.err" || true
	c1=$(cpu_ticks "$proxy_pid") k1=$(kworker_ticks)
	if ! res=$("$py" "$here/tool.py" iperf "$out"); then
		fail_or_warn "$mode" "run $run: $mode: iperf3 -P $streams failed: $res $(head -c 300 "$out.err")"
		return 0
	fi
	read -r gbps bytes <<<"$res"
	log "run $run $mode iperf3 -P $streams: $gbps Gbit/s"
	record "$run" "$mode" "iperf${streams}_gbps" "$gbps"
	proxied "$mode" "$run" "iperf3 -P $streams" "$c0" "$c1"
	if [[ $streams == 1 && -n $proxy_pid ]] && ((bytes > 0)); then
		record "$run" "$mode" cpu_per_gib_ms "$(calc "($c1 - $c0) * 1000.0 / $clk_tck / ($bytes / 1073741824)")"
	fi
	if [[ $streams == 1 ]] && ((bytes > 0)); then
		record "$run" "$mode" kworker_per_gib_ms "$(calc "($k1 - $k0) * 1000.0 / $clk_tck / ($bytes / 1073741824)")"
	fi
	if awk -v g="$gbps" 'BEGIN { exit !(g <= 0) }'; then
		fail_or_warn "$mode" "run $run: $mode: iperf3 -P $streams moved nothing"
	fi
}

# ---- workloads 2-4, 6: wrk ---------------------------------------------------------------

# to_us VALUE_WITH_UNIT: wrk's latency (e.g. 180.00us, 1.20ms, 2.00s) in µs.
to_us() {
	awk -v v="$1" 'BEGIN {
		n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
		if (u == "ms") n *= 1000; else if (u == "s") n *= 1000000; else if (u == "m") n *= 60000000
		printf "%.1f\n", n
	}'
}

run_wrk() {
	local run=$1 mode=$2 kind=$3 port out args c0 c1 k0 k1 reqs rps errs non2xx p50 p99 b0 b1 rc=0
	port=$(port_for "$mode" "$nginx_port" "$hp_http")
	out=$tmp/wrk-$mode-$run-$kind.txt
	if [[ $kind == close ]]; then
		args=(-t2 -c32 -H 'Connection: close')
	else
		args=(-t2 -c8)
	fi
	b0=$tmp/bpf0.json b1=$tmp/bpf1.json
	is_kt "$mode" && [[ $kind == close && $skip_bpf == 0 ]] && bpftool -j prog show >"$b0" 2>/dev/null
	c0=$(cpu_ticks "$proxy_pid") k0=$(kworker_ticks)
	in_cg timeout -k 5 $((wrk_d + 20)) wrk "${args[@]}" -d "${wrk_d}s" --latency "http://127.0.0.1:$port/" \
		>"$out" 2>&1 || rc=$?
	c1=$(cpu_ticks "$proxy_pid") k1=$(kworker_ticks)
	is_kt "$mode" && [[ $kind == close && $skip_bpf == 0 ]] && bpftool -j prog show >"$b1" 2>/dev/null
	reqs=$(awk '/ requests in / {print $1; exit}' "$out")
	rps=$(awk '/^Requests\/sec:/ {print $2; exit}' "$out")
	errs=$(sed -n 's/.*Socket errors: connect \([0-9]*\), read \([0-9]*\), write \([0-9]*\), timeout \([0-9]*\).*/\1 \2 \3 \4/p' "$out")
	errs=${errs:-0 0 0 0}
	non2xx=$(awk '/Non-2xx or 3xx responses:/ {print $NF; exit}' "$out")
	non2xx=${non2xx:-0}
	p50=$(awk '$1 == "50%" {print $2; exit}' "$out")
	p99=$(awk '$1 == "99%" {print $2; exit}' "$out")
	if [[ -z $reqs || -z $rps ]]; then
		cat "$out" >&2
		fail_or_warn "$mode" "run $run: $mode: wrk ($kind) failed (exit $rc)"
		return 0
	fi
	read -r e_conn e_read e_write e_timeout <<<"$errs"
	log "run $run $mode wrk $kind: $reqs requests, $rps/s, p50 ${p50:-?}, p99 ${p99:-?}," \
		"socket errors: connect $e_conn, read $e_read, write $e_write, timeout $e_timeout; non-2xx $non2xx"
	record "$run" "$mode" "${kind}_rps" "$rps"
	record "$run" "$mode" "${kind}_err_connect" "$e_conn"
	record "$run" "$mode" "${kind}_err_read" "$e_read"
	record "$run" "$mode" "${kind}_err_write" "$e_write"
	record "$run" "$mode" "${kind}_err_timeout" "$e_timeout"
	record "$run" "$mode" "${kind}_non2xx" "$non2xx"
	if [[ $kind == ka ]]; then
		[[ -n $p50 ]] && record "$run" "$mode" ka_p50_us "$(to_us "$p50")"
		[[ -n $p99 ]] && record "$run" "$mode" ka_p99_us "$(to_us "$p99")"
	fi
	if ((reqs == 0)); then
		fail_or_warn "$mode" "run $run: $mode: wrk ($kind) completed no request"
		return 0
	fi
	if ((smoke)) && ((e_conn + e_read + e_write + e_timeout + non2xx > 0)); then
		problems+=("run $run: $mode: wrk ($kind) saw socket errors or non-2xx responses")
	fi
	proxied "$mode" "$run" "wrk ($kind)" "$c0" "$c1"
	if [[ $kind == close ]]; then
		record "$run" "$mode" kworker_per_conn_us "$(calc "($k1 - $k0) * 1e6 / $clk_tck / $reqs")"
	else
		record "$run" "$mode" kworker_per_ka_req_us "$(calc "($k1 - $k0) * 1e6 / $clk_tck / $reqs")"
	fi
	if [[ -n $proxy_pid ]]; then
		if [[ $kind == close ]]; then
			record "$run" "$mode" cpu_per_conn_us "$(calc "($c1 - $c0) * 1e6 / $clk_tck / $reqs")"
		else
			record "$run" "$mode" cpu_per_ka_req_us "$(calc "($c1 - $c0) * 1e6 / $clk_tck / $reqs")"
		fi
	fi
	if is_kt "$mode" && [[ $kind == close && $skip_bpf == 0 && -s $b0 && -s $b1 ]]; then
		local metrics connects
		metrics=$("$py" "$here/tool.py" bpf-delta "$prog_ids" "$b0" "$b1" "$reqs")
		while read -r m v; do [[ -n $m ]] && record "$run" "$mode" "$m" "$v"; done <<<"$metrics"
		connects=$(awk '$1 == "bpf.ktproxy_connect4.runs" {print $2}' <<<"$metrics")
		if [[ $(cat /proc/sys/kernel/bpf_stats_enabled 2>/dev/null) != 1 ]]; then
			# kernel.bpf_stats_enabled is machine-wide: another benchmark
			# restoring it mid-run leaves the counters proving nothing.
			warnings+=("run $run: kernel.bpf_stats_enabled was turned off by someone else during $mode's run")
		elif [[ -n $connects ]] && ((connects < reqs)); then
			problems+=("run $run: ktproxy_connect4 ran ${connects:-0} times for $reqs connections: not proxied?")
		fi
	fi
}

# ---- workload 7: DNS (ktproxy only) ----------------------------------------------------

# The DNS rows need a ktproxy that answers DNS (issue 9).
skip_dns=0
"$ktproxy" --help 2>/dev/null | grep -q -- --proxy-dns || skip_dns=1

# pss_kib PID
pss_kib() { awk '/^Pss:/ {print $2}' "/proc/$1/smaps_rollup"; }

run_dns() {
	local run=$1 out line pss0 pss1 kept
	out=$tmp/dns-$run.txt
	# 127.0.0.153:53: nothing listens there, so an answer proves the redirect.
	if ! in_cg timeout -k 5 $((dns_t + 60)) "$testclient" dns-bench 127.0.0.153:53 --seconds "$dns_t" \
		>"$out" 2>&1; then
		problems+=("run $run: DNS: $(tail -1 "$out")")
		return 0
	fi
	line=$(tail -1 "$out")
	log "run $run ktproxy $line"
	[[ $line =~ p50_us=([0-9.]+)\ p99_us=([0-9.]+)\ qps=([0-9]+)\ lost=([0-9]+) ]] || {
		problems+=("run $run: DNS: dns-bench said: $line")
		return 0
	}
	record "$run" ktproxy dns_p50_us "${BASH_REMATCH[1]}"
	record "$run" ktproxy dns_p99_us "${BASH_REMATCH[2]}"
	record "$run" ktproxy dns_qps "${BASH_REMATCH[3]}"
	record "$run" ktproxy dns_lost "${BASH_REMATCH[4]}"
	# Memory: Pss growth while $dns_names distinct names go through a table
	# that keeps 65,536 of them.
	pss0=$(pss_kib "$proxy_pid")
	if ! in_cg timeout -k 5 $((dns_names / 1000 + 60)) "$testclient" dns-bench 127.0.0.153:53 --seconds 0 \
		--names "$dns_names" >"$out" 2>&1; then
		problems+=("run $run: DNS names: $(tail -1 "$out")")
		return 0
	fi
	pss1=$(pss_kib "$proxy_pid")
	kept=$((dns_names < 65536 ? dns_names : 65536))
	log "run $run ktproxy DNS $(tail -1 "$out"); Pss ${pss0}->${pss1} KiB"
	record "$run" ktproxy dns_bytes_per_name "$(calc "($pss1 - $pss0) * 1024 / $kept")"
	record "$run" ktproxy dns_pss_kib "$(calc "$pss1 - $pss0")"
}

# ---- the runs ---------------------------------------------------------------------------

# modes_for RUN: the modes, rotated by the run number, so no mode always
# comes first (after an idle machine) or last.
modes_for() {
	local n=${#modes[@]} i
	for ((i = 0; i < n; i++)); do echo "${modes[(i + $1 - 1) % n]}"; done
}

nginx_note="nginx: 1 worker"
((skip_wrk)) && echo "SKIP: new connections/s and keep-alive rows: wrk or nginx is not installed"
((skip_iperf)) && echo "SKIP: iperf3 rows: iperf3 is not installed"
((skip_bpf)) && echo "SKIP: BPF run-time rows: bpftool is not installed"
((skip_dns)) && echo "SKIP: DNS rows: this ktproxy has no --proxy-dns"

log "modes: ${modes[*]}; $runs run(s); iperf3 ${iperf_t}s, wrk ${wrk_d}s, $idle_n idle connections; cgroup $cg"
started=$SECONDS

# Phase 1: idle connections first, before wrk leaves tens of thousands of
# TIME_WAIT sockets whose slab is freed during the measurement.
for ((run = 1; run <= runs; run++)); do
	for mode in $(modes_for "$run"); do
		start_proxy "$mode" "$run" || continue
		idle_test "$run" "$mode"
		stop_proxy "$mode" "$run"
	done
done

# Phase 2: throughput, connection rate, CPU, BPF cost.
for ((run = 1; run <= runs; run++)); do
	for mode in $(modes_for "$run"); do
		start_proxy "$mode" "$run" || continue
		if ((!skip_iperf)); then
			run_iperf "$run" "$mode" 1
			run_iperf "$run" "$mode" 4
		fi
		if ((!skip_wrk)); then
			run_wrk "$run" "$mode" ka
			run_wrk "$run" "$mode" close
		fi
		stop_proxy "$mode" "$run"
	done
done
# Phase 3: DNS, ktproxy only.
if ((!skip_dns)); then
	proxy_extra=(--proxy-dns)
	for ((run = 1; run <= runs; run++)); do
		start_proxy ktproxy "$run" || continue
		run_dns "$run"
		stop_proxy ktproxy "$run"
	done
	proxy_extra=()
fi
# Phase 4: start-up (ktproxy only): spawn to ready line, without rules and
# with a 10,000-line --exclude-file (the rules go into the kernel's LPM
# tries before the ready line).
"$py" "$here/tool.py" rules "$tmp/rules.txt" 10000
for ((run = 1; run <= runs; run++)); do
	for what in startup_ms startup_rules_ms; do
		rules=()
		[[ $what == startup_rules_ms ]] && rules=(--exclude-file "$tmp/rules.txt")
		if ms=$("$py" "$here/tool.py" startup "$ktproxy" -c "$cg" -l "127.0.0.1:$kt_port" \
			"${rules[@]}"); then
			log "run $run ktproxy $what: $ms"
			record "$run" ktproxy "$what" "$ms"
		else
			problems+=("run $run: ktproxy start-up ($what): $ms")
		fi
	done
done
log "done in $((SECONDS - started)) s"

# ---- the table -----------------------------------------------------------------------------

what="medians of $runs runs"
((runs == 1)) && what="1 run"
((smoke)) && what="smoke run, not a measurement"
hp_note=
((use_haproxy)) && hp_note=", $(haproxy -v 2>/dev/null | awk 'NR == 1 {print "HAProxy " $3}') mode tcp nbthread 2"
title="ktproxy benchmark: $(date -u +%Y-%m-%d), Linux $(uname -r), $(nproc) vCPU, $what;"
title+=" iperf3 ${iperf_t} s, wrk ${wrk_d} s, $idle_n idle connections; $nginx_note$hp_note; all on 127.0.0.1."
echo
"$py" "$here/tool.py" report "$results" "$(
	IFS=,
	echo "${modes[*]}"
)" "$title"

for w in "${warnings[@]}"; do echo "WARNING: $w"; done
if [[ ${#problems[@]} -gt 0 ]]; then
	for p in "${problems[@]}"; do echo "FAIL: $p"; done
	[[ -f $tmp/ktproxy.log ]] && { echo "ktproxy log (last lines):"; tail -20 "$tmp/ktproxy.log"; }
	exit 1
fi
exit 0
