#!/bin/bash
# PID 1 of a scripts/vmtest.sh guest. Sets the machine up as systemd would
# (the mounts, a loopback, RLIMIT_NOFILE 1024:524288) plus an interface with
# addresses of its own, runs every test executable listed in
# /vmtest/tests.tsv (or only the smoke check when /vmtest/smoke exists),
# writes the results to the second disk as a tar stream and powers off.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8 TERM=dumb RUST_BACKTRACE=1
unset BOOT_IMAGE
# What scripts/vmtest.sh hands the tests: KTPROXY_TEST_TIME_SCALE,
# KTPROXY_STRESS_CONNECTIONS, ... (NAME=VALUE lines).
while IFS= read -r kv; do
	[[ $kv == *=* ]] && export "$kv"
done </vmtest/env

# Seconds one test executable may take (scripts/vmtest.sh sizes it).
per_exe_timeout=$(cat /vmtest/exe_timeout)

fs() { # TYPE DIR [OPTIONS]
	mkdir -p "$2"
	mountpoint -q "$2" || mount -t "$1" ${3:+-o "$3"} "$1" "$2"
}
fs proc /proc
fs sysfs /sys
fs devtmpfs /dev
fs devpts /dev/pts
fs tmpfs /dev/shm mode=1777
fs tmpfs /run mode=755
fs tmpfs /tmp mode=1777
fs cgroup2 /sys/fs/cgroup nsdelegate
fs bpf /sys/fs/bpf mode=700
mount -o remount,rw /
ip link set lo up
# A host has an address besides loopback, and tests send to "this host's
# own address" (DNS, the command-mode guard's UDP). A dummy interface gives
# the guest one, IPv4 and IPv6, with no network behind it: what is sent
# there stays in the guest. The addresses are those of the development
# machine's eth0; nodad makes the IPv6 one usable at once.
modprobe dummy 2>/dev/null
if ! { ip link add vmtest0 type dummy && ip link set vmtest0 up &&
	ip addr add 192.0.2.2/24 dev vmtest0 && ip addr add fd00::2/64 dev vmtest0 nodad; }; then
	echo "vmtest-init: could not set up the dummy interface vmtest0"
fi
hostname vmtest
ulimit -Hn 524288 && ulimit -Sn 1024
# Every controller for the cgroups below the root, as systemd enables them
# (tests cap a process's threads with pids.max).
for c in $(cat /sys/fs/cgroup/cgroup.controllers); do
	echo "+$c" >/sys/fs/cgroup/cgroup.subtree_control 2>/dev/null ||
		echo "vmtest-init: could not enable the $c controller"
done
# Since 6.2 a kernel may refuse TIOCSTI to everyone (CONFIG_LEGACY_TIOCSTI
# off: Debian's 6.12). Allow it, as 6.1 and the development machine do, so
# that the --user tests check ktproxy's own protection of the caller's
# terminal, not the kernel's.
if [[ -w /proc/sys/dev/tty/legacy_tiocsti ]]; then
	echo 1 >/proc/sys/dev/tty/legacy_tiocsti
fi

results=/vmtest/results
mkdir -p "$results"
cut -d' ' -f1 /proc/uptime >"$results/boot"
uname -r >"$results/uname"
echo "vmtest-init: $(uname -r) up after $(cat "$results/boot") s"

# run LABEL EXECUTABLE DIRECTORY [ARG...]: one line in summary.tsv, its
# output in LABEL.log.
run() {
	local log start rc summary label=$1 exe=$2 dir=$3
	shift 3
	log=$results/$(tr ' /' '__' <<<"$label").log
	echo "vmtest-init: running $label"
	start=$(date +%s)
	(cd "$dir" && exec timeout -k 10 "$per_exe_timeout" "$exe" "$@" "${args[@]}") >"$log" 2>&1 </dev/null
	rc=$?
	# libtest's "test result: ok. 69 passed; 0 failed; 0 ignored; ...": the
	# last one is the executable's own (tests/relay.rs runs itself as a
	# client, whose result line comes first).
	summary=$(awk '/^test result: /{ p = $4; f = $6; i = $8; n = 1 }
		END { if (n) printf "%d passed, %d failed, %d ignored", p, f, i }' "$log")
	[[ -n $summary ]] || summary=$(tail -n 1 "$log" | cut -c1-120)
	[[ $rc -eq 124 ]] && summary="timed out after $per_exe_timeout s; $summary"
	printf '%s\t%s\t%s\t%s\n' "$label" "$rc" "$(($(date +%s) - start))" "$summary" \
		>>"$results/summary.tsv"
	save
}

# The results so far onto the second disk: a boot cut short (the host's
# timeout) still reports what finished.
save() {
	tar -C "$results" -cf /dev/vdb . && sync
}

# Arguments for every test executable (scripts/vmtest.sh ... -- ARGS).
mapfile -t args </vmtest/args
if [[ -f /vmtest/smoke ]]; then
	run smoke /sbin/vmtest-smoke /
else
	# Column 4: the executable's own arguments, one per line in a file
	# (--skip NAME for tests the guest cannot run; --show-output, so that
	# the log keeps what passing tests measured).
	while IFS=$'\t' read -r label exe dir own; do
		mapfile -t own_args <"/vmtest/$own"
		run "$label" "$exe" "$dir" "${own_args[@]}"
	done </vmtest/tests.tsv
fi

dmesg >"$results/dmesg.txt" 2>&1
: >"$results/complete"
save
echo "vmtest-init: done, powering off"
echo o >/proc/sysrq-trigger
sleep 30
busybox poweroff -f
