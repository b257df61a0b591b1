#!/bin/bash
# PID 1 of a scripts/vmtest.sh guest. Sets the machine up as systemd would
# (the mounts, a loopback, RLIMIT_NOFILE 1024:524288), runs every test
# executable listed in /vmtest/tests.tsv (or only the smoke check when
# /vmtest/smoke exists), writes the results to the second disk as a tar
# stream and powers off.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8 TERM=dumb RUST_BACKTRACE=1
unset BOOT_IMAGE

# Seconds one test executable may take.
per_exe_timeout=1800

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
hostname vmtest
ulimit -Hn 524288 && ulimit -Sn 1024

results=/vmtest/results
mkdir -p "$results"
cut -d' ' -f1 /proc/uptime >"$results/boot"
uname -r >"$results/uname"
echo "vmtest-init: $(uname -r) up after $(cat "$results/boot") s"

# run LABEL EXECUTABLE DIRECTORY: one line in summary.tsv, its output in LABEL.log.
run() {
	local log start rc summary
	log=$results/$(tr ' /' '__' <<<"$1").log
	echo "vmtest-init: running $1"
	start=$(date +%s)
	(cd "$3" && exec timeout -k 10 "$per_exe_timeout" "$2" "${args[@]}") >"$log" 2>&1 </dev/null
	rc=$?
	# libtest's "test result: ok. 69 passed; 0 failed; 0 ignored; ..."
	summary=$(awk '/^test result: /{ p += $4; f += $6; i += $8; n++ }
		END { if (n) printf "%d passed, %d failed, %d ignored", p, f, i }' "$log")
	[[ -n $summary ]] || summary=$(tail -n 1 "$log" | cut -c1-120)
	[[ $rc -eq 124 ]] && summary="timed out after $per_exe_timeout s; $summary"
	printf '%s\t%s\t%s\t%s\n' "$1" "$rc" "$(($(date +%s) - start))" "$summary" \
		>>"$results/summary.tsv"
}

# Arguments for every test executable (scripts/vmtest.sh ... -- ARGS).
mapfile -t args </vmtest/args
if [[ -f /vmtest/smoke ]]; then
	run smoke /sbin/vmtest-smoke /
else
	while IFS=$'\t' read -r label exe dir; do
		run "$label" "$exe" "$dir"
	done </vmtest/tests.tsv
fi

dmesg >"$results/dmesg.txt" 2>&1
tar -C "$results" -cf /dev/vdb . && sync
echo "vmtest-init: done, powering off"
echo o >/proc/sysrq-trigger
sleep 30
busybox poweroff -f
