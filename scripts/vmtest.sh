#!/usr/bin/env bash
# Runs every test executable of `cargo test --release` on other kernels, each
# booted under qemu (TCG: no KVM needed), from Debian packages only.
#
#   sudo scripts/vmtest.sh                       # Debian 12's 6.1 and 6.12
#   sudo scripts/vmtest.sh linux-image-6.12-amd64 linux-image-amd64/bullseye
#   sudo scripts/vmtest.sh --smoke               # load, redirect, curl, SIGTERM only
#   sudo scripts/vmtest.sh linux-image-amd64 -- running_out
#                                    # ARGS after -- go to every test executable
#
# A KERNEL_PACKAGE is a Debian package name, optionally PACKAGE/SUITE to take
# it from another Debian release (bullseye's 5.10: linux-image-amd64/bullseye).
# Prints one line per kernel and test executable; exits non-zero on any failure.
#
# The guest is a Debian 12 minbase with the packages in guest_pkgs and one
# kernel package installed in a chroot; its root is an ext4 image made with
# `mkfs.ext4 -d`, and scripts/vmtest/init.sh is its init. The test executables
# and the binaries they start are copied to the very paths cargo built them
# at. Results come back on a second disk, as a tar stream. No network, no
# loop devices, no mounts outside a private mount namespace.
#
# The guest has no network: a dummy interface gives it addresses of its own
# (192.0.2.2/24, fd00::2/64). Tests that cannot run there are skipped with a
# SKIP line that says why (see guest_skip below).
#
# Cached under $VMTEST_CACHE (default /var/tmp/ktproxy-vmtest): the base root
# and each kernel, keyed on everything below that goes into them.
# VMTEST_REFRESH=1 rebuilds them (to pick up a newer kernel point release).
# VMTEST_TIME_SCALE: how much slower than the host the guest runs, for the
# tests' waits (KTPROXY_TEST_TIME_SCALE in the guest; default 10).
# KTPROXY_STRESS_CONNECTIONS: connections of the stress tests in the guest
# (default 500); other KTPROXY_* variables are passed on as they are.
# VMTEST_EXE_TIMEOUT: seconds one test executable may take (default 600;
# the slowest, dns and core, took 55-85 s idle and ~110 s at a load of 15).
# VMTEST_TIMEOUT: seconds one boot may take in all (default 1800; a whole
# boot took 300 s idle, ~450 s at a load of 15). A boot cut short still
# reports the executables that finished, and which one was running.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo=$(pwd -P)
if [[ $EUID -ne 0 ]]; then
	echo "vmtest.sh: building the guest root (debootstrap, chroot) needs root: sudo $0" >&2
	exit 1
fi

# What the guest carries: whatever the tests and the smoke check run (the
# runtime half of scripts/deps.sh's list, plus what a bare root lacks), and
# the libraries ktproxy links to.
guest_pkgs=(python3 curl iproute2 bpftool microsocks tinyproxy busybox-static procps
	netcat-openbsd ca-certificates libelf1 zlib1g kmod initramfs-tools
	dnsutils nftables util-linux)
# What the host needs on top of scripts/deps.sh.
host_pkgs=(debootstrap qemu-system-x86 e2fsprogs)
default_kernels=(linux-image-amd64 linux-image-6.12-amd64)
suite=bookworm
# Bump when the recipe of the base root or of a kernel changes.
recipe=4

cache=${VMTEST_CACHE:-/var/tmp/ktproxy-vmtest}
time_scale=${VMTEST_TIME_SCALE:-10}
exe_timeout=${VMTEST_EXE_TIMEOUT:-600}
vm_timeout=${VMTEST_TIMEOUT:-1800}
# Tests the guest cannot run, by test executable: "NAME|why". Kernel-
# independent, they run on the host in scripts/test.sh.
declare -A guest_skip=(
	["test packaging"]="deb_package_holds_ktproxy_its_man_page_units_and_conffile_and_no_test_helper|builds the .deb with cargo and dpkg-shlibdeps, a toolchain the guest does not carry; kernel-independent, it runs on the host in scripts/test.sh"
)

smoke=0
kernels=()
test_args=()
while [[ $# -gt 0 ]]; do
	a=$1
	shift
	case $a in
	--)
		test_args=("$@")
		break
		;;
	--smoke) smoke=1 ;;
	-h | --help)
		sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
		exit 0
		;;
	-*)
		echo "vmtest.sh: unknown option $a (see --help)" >&2
		exit 2
		;;
	*) kernels+=("$a") ;;
	esac
done
[[ ${#kernels[@]} -gt 0 ]] || kernels=("${default_kernels[@]}")

say() { echo "vmtest: [${SECONDS} s] $*" >&2; }
die() {
	say "$*"
	exit 1
}

# --- the host ---------------------------------------------------------------

scripts/deps.sh
command -v cargo >/dev/null || PATH="$PATH:$HOME/.cargo/bin"

missing=()
for p in "${host_pkgs[@]}"; do
	[[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) == 'install ok installed' ]] ||
		missing+=("$p")
done
if [[ ${#missing[@]} -gt 0 ]]; then
	say "installing on the host: ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq >/dev/null
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The Debian archive and its security archive, as this host's apt knows them
# (deb822 or one-line sources); debootstrap's own default otherwise.
apt_site() {
	apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 2>/dev/null |
		awk -v want="$1" '$2 == want { print $1; exit }'
}
mirror=${VMTEST_MIRROR:-$(apt_site "$suite")}
mirror=${mirror%/}
if [[ -z $mirror ]]; then
	mirror=$(sed -n 's/^default_mirror //p' /usr/share/debootstrap/scripts/debian-common 2>/dev/null || true)
fi
[[ -n $mirror ]] || die "no Debian mirror found in apt's sources: set VMTEST_MIRROR"
security=${VMTEST_SECURITY_MIRROR:-$(apt_site "$suite-security")}
security=${security%/}
# A fresh debootstrap root lists no security archive: it sits next to the
# main one on Debian's mirrors.
[[ -n $security ]] || security=${mirror%/debian}/debian-security

# --- the test executables ---------------------------------------------------

say "building the test executables (cargo test --release --no-run)"
json=$(mktemp)
work=
cleanup() {
	rm -f "$json"
	[[ -n $work && -d $work ]] && rm -rf "$work"
	return 0
}
trap cleanup EXIT
trap 'exit 130' INT TERM
cargo test --release --no-run --message-format=json >"$json"
# Every executable cargo built (the binaries the tests start among them), and
# which of them are test executables, with their package's directory (cargo
# test runs each there) and a label "KIND NAME".
mapfile -t artifacts < <(python3 - "$json" <<'EOF'
import json, os, sys
seen = set()
for line in open(sys.argv[1]):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    exe = m.get("executable") if m.get("reason") == "compiler-artifact" else None
    if not exe or exe in seen:
        continue
    seen.add(exe)
    t = m["target"]
    test = "test" if m["profile"]["test"] else "bin"
    label = "%s %s" % ("/".join(t["kind"]), t["name"])
    print("\t".join([test, exe, os.path.dirname(m["manifest_path"]), label]))
EOF
)
mapfile -t artifacts < <(printf '%s\n' "${artifacts[@]}" | sort -t $'\t' -k4)
ntests=0
for a in "${artifacts[@]}"; do [[ $a == test$'\t'* ]] && ntests=$((ntests + 1)); done
[[ $ntests -gt 0 ]] || die "cargo built no test executable"

# --- the cached guest root and kernels --------------------------------------

mkdir -p "$cache"
exec 9>"$cache/lock"
flock 9

key_of() { printf '%s\n' "$@" | sha256sum | cut -c1-16; }

# chroot_run DIR COMMAND...: COMMAND inside DIR, with /proc and /dev/pts
# mounted in a mount namespace of its own (gone when COMMAND ends).
chroot_run() {
	local dir=$1
	shift
	unshare --mount --propagation private -- bash -c '
		dir=$1; shift
		mount -t proc proc "$dir/proc"
		mount -t devpts devpts "$dir/dev/pts" 2>/dev/null || true
		exec chroot "$dir" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
			LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive "$@"' vmtest "$dir" "$@"
}

sources() { # SUITE
	cat <<EOF
deb $mirror $1 main
deb $mirror $1-updates main
deb $security $1-security main
EOF
}

base_key=$(key_of "$recipe" "$suite" "$mirror" "$security" "${guest_pkgs[@]}")
base=$cache/base-$base_key
if [[ ${VMTEST_REFRESH:-0} == 1 || ! -d $base ]]; then
	rm -rf "$base" "$base.tmp"
	say "building the guest root $base (debootstrap $suite, about 2 minutes)"
	debootstrap --variant=minbase "$suite" "$base.tmp" "$mirror" >"$cache/debootstrap.log" 2>&1 ||
		die "debootstrap failed; see $cache/debootstrap.log"
	sources "$suite" >"$base.tmp/etc/apt/sources.list"
	cp /etc/resolv.conf "$base.tmp/etc/resolv.conf" 2>/dev/null || true
	# No daemon may start inside the chroot (tinyproxy's postinst tries).
	printf '#!/bin/sh\nexit 101\n' >"$base.tmp/usr/sbin/policy-rc.d"
	chmod +x "$base.tmp/usr/sbin/policy-rc.d"
	# Every kernel's initramfs must find a virtio disk with ext4 on it, and
	# needs nothing else: MODULES=list makes it small and quick to build.
	mkdir -p "$base.tmp/etc/initramfs-tools/conf.d"
	printf '%s\n' virtio_pci virtio_blk ext4 >>"$base.tmp/etc/initramfs-tools/modules"
	echo MODULES=list >"$base.tmp/etc/initramfs-tools/conf.d/vmtest"
	chroot_run "$base.tmp" sh -c "apt-get update -qq && apt-get install -y -qq \
		--no-install-recommends ${guest_pkgs[*]}" >>"$cache/debootstrap.log" 2>&1 ||
		die "installing the guest packages failed; see $cache/debootstrap.log"
	chroot_run "$base.tmp" apt-get clean
	echo vmtest >"$base.tmp/etc/hostname"
	printf '127.0.0.1\tlocalhost vmtest\n::1\tlocalhost ip6-localhost ip6-loopback\n' \
		>"$base.tmp/etc/hosts"
	mv "$base.tmp" "$base"
fi

# What an older recipe or package list left behind.
for d in "$cache"/base-* "$cache"/kernel-*; do
	[[ -d $d && $d != "$base" && $d != *.tmp ]] || continue
	[[ $d == "$cache"/kernel-* && $(cat "$d/base" 2>/dev/null) == "$base_key" ]] && continue
	say "removing the outdated $d"
	rm -rf "$d"
done

# kernel_dir SPEC: a directory with vmlinuz, initrd.img, modules/VERSION and
# version (uname -r, package version) and base (the base's key), built from a
# copy of the base.
kernel_dir() {
	local spec=$1 ksuite dir tmp
	ksuite=
	[[ $spec == */* ]] && ksuite=${spec#*/}
	dir=$cache/kernel-${spec//\//-}-$(key_of "$base_key" "$spec")
	if [[ ${VMTEST_REFRESH:-0} == 1 || ! -d $dir ]]; then
		rm -rf "$dir" "$dir.tmp"
		tmp=$dir.tmp
		say "installing $spec into a copy of the guest root"
		cp -a "$base" "$tmp.root"
		[[ -z $ksuite ]] || sources "$ksuite" >"$tmp.root/etc/apt/sources.list.d/$ksuite.list"
		if ! chroot_run "$tmp.root" sh -c "apt-get update -qq && apt-get install -y -qq \
			--no-install-recommends $spec" >"$cache/kernel.log" 2>&1; then
			rm -rf "$tmp.root"
			die "installing $spec failed; see $cache/kernel.log"
		fi
		mkdir -p "$tmp/modules"
		local kver
		kver=$(ls "$tmp.root/lib/modules")
		[[ $(wc -w <<<"$kver") -eq 1 ]] || die "$spec installed kernels '$kver'"
		cp "$tmp.root/boot/vmlinuz-$kver" "$tmp/vmlinuz"
		cp "$tmp.root/boot/initrd.img-$kver" "$tmp/initrd.img" ||
			die "$spec built no initramfs; see $cache/kernel.log"
		mv "$tmp.root/lib/modules/$kver" "$tmp/modules/"
		echo "$kver $(chroot "$tmp.root" dpkg-query -W -f='${Version}' "linux-image-$kver")" \
			>"$tmp/version"
		echo "$base_key" >"$tmp/base"
		rm -rf "$tmp.root"
		mv "$tmp" "$dir"
	fi
	echo "$dir"
}

kdirs=()
for k in "${kernels[@]}"; do
	d=$(kernel_dir "$k")
	kdirs+=("$d")
done

# --- the guest image --------------------------------------------------------

work=$(mktemp -d "$cache/run.XXXXXX")
root=$work/root
# Hard links: nothing below writes into a file that came from the cache.
cp -al "$base" "$root"
mkdir -p "$root/lib/modules"
for d in "${kdirs[@]}"; do cp -al "$d"/modules/* "$root/lib/modules/"; done
# A host has a resolv.conf (tests mount their own over it); the host's
# nameservers would mean nothing in a guest without network. A new file:
# the old one is a hard link into the cache.
rm -f "$root/etc/resolv.conf"
printf '# scripts/vmtest.sh: this guest has no network\nnameserver 127.0.0.1\n' \
	>"$root/etc/resolv.conf"
install -m 755 scripts/vmtest/init.sh "$root/sbin/vmtest-init"
install -m 755 scripts/vmtest/smoke.sh "$root/sbin/vmtest-smoke"
mkdir -p "$root/vmtest/args.d"
: >"$root/vmtest/tests.tsv"
# mkdirs DIR: DIR and its parents in the guest, with the host's modes (a
# checkout under a 0700 home must stay out of other users' reach there too).
mkdirs() {
	local d=$1
	[[ $d == / || -d $root$d ]] && return 0
	mkdirs "$(dirname "$d")"
	mkdir "$root$d"
	chmod "$(stat -c %a "$d")" "$root$d"
}
skipped=()
declare -A copied=()
n=0
for a in "${artifacts[@]}"; do
	IFS=$'\t' read -r kind exe dir label <<<"$a"
	mkdirs "$(dirname "$exe")"
	cp "$exe" "$root$exe"
	[[ $kind == test ]] || continue
	# The package's sources too (tests read files of the checkout, e.g. the
	# man page and units in scripts/deb), not its build output.
	if [[ -z ${copied[$dir]:-} ]]; then
		mkdirs "$dir"
		tar -C "$dir" --exclude=./target --exclude=./.git -cf - . | tar -C "$root$dir" -xf -
		copied[$dir]=1
	fi
	# Its own arguments: --show-output keeps in the log what passing tests
	# print (their measurements); --skip for what the guest cannot run.
	n=$((n + 1))
	own=args.d/$n
	echo --show-output >"$root/vmtest/$own"
	if [[ -n ${guest_skip[$label]:-} ]]; then
		printf -- '--skip\n%s\n' "${guest_skip[$label]%%|*}" >>"$root/vmtest/$own"
		skipped+=("$label ${guest_skip[$label]%%|*}: ${guest_skip[$label]#*|}")
	fi
	printf '%s\t%s\t%s\t%s\n' "$label" "$exe" "$dir" "$own" >>"$root/vmtest/tests.tsv"
done
# The smoke check uses the binaries at their usual place.
printf '%s\n' "$repo/target/release" >"$root/vmtest/bin"
if [[ ${#test_args[@]} -gt 0 ]]; then
	printf '%s\n' "${test_args[@]}" >"$root/vmtest/args"
else
	: >"$root/vmtest/args"
fi
[[ $smoke == 1 ]] && : >"$root/vmtest/smoke"
echo "$exe_timeout" >"$root/vmtest/exe_timeout"
# The tests' environment: their waits scaled for emulation, a smaller
# stress load, and whatever KTPROXY_* the caller set.
{
	env | grep -E '^KTPROXY_[A-Z0-9_]*=' | grep -Ev '^KTPROXY_(TEST_TIME_SCALE|STRESS_CONNECTIONS)=' || true
	echo "KTPROXY_TEST_TIME_SCALE=$time_scale"
	echo "KTPROXY_STRESS_CONNECTIONS=${KTPROXY_STRESS_CONNECTIONS:-500}"
} >"$root/vmtest/env"

size=$(($(du -sm "$root" | cut -f1) + 768))
mkfs.ext4 -q -F -L vmtest -d "$root" "$work/root.img" "${size}M" >/dev/null ||
	die "mkfs.ext4 -d failed"
rm -rf "$root"

# --- the runs ---------------------------------------------------------------

logs=$cache/logs
mkdir -p "$logs"
passed=0
failed=0
line() { # STATUS KERNEL WHAT DETAIL
	printf 'vmtest: %-4s %-22s %-26s %s\n' "$1" "$2" "$3" "$4"
	if [[ $1 == PASS ]]; then passed=$((passed + 1)); else failed=$((failed + 1)); fi
}

for d in "${kdirs[@]}"; do
	read -r kver pver <"$d/version"
	out=$logs/$kver
	rm -rf "$out"
	mkdir -p "$out"
	truncate -s 256M "$work/results.img"
	say "booting $kver ($pver) under qemu TCG (load average $(cut -d' ' -f1-3 /proc/loadavg))"
	start=$SECONDS
	set +e
	# thread=single: with one host thread per vCPU (multi-threaded TCG) a
	# guest CPU can run a stale translation of kernel text another CPU has
	# just patched: static keys flip whenever the first or last cgroup BPF
	# program of a type comes or goes, which these tests do all the time. 6.12
	# died of it once ("Oops: int3" in __alloc_pages, a jump label being
	# patched). One host thread for both vCPUs keeps the code coherent.
	timeout "$vm_timeout" qemu-system-x86_64 -accel tcg,thread=single -cpu max -m 2048 -smp 2 \
		-display none -monitor none -serial "file:$out/console.log" -nic none -no-reboot \
		-kernel "$d/vmlinuz" -initrd "$d/initrd.img" \
		-append "console=ttyS0 root=/dev/vda rw init=/sbin/vmtest-init panic=-1 loglevel=4" \
		-drive "file=$work/root.img,format=raw,if=virtio,snapshot=on" \
		-drive "file=$work/results.img,format=raw,if=virtio" >"$out/qemu.log" 2>&1
	rc=$?
	set -e
	took=$((SECONDS - start))
	tar -xf "$work/results.img" -C "$out" 2>/dev/null || true
	rm -f "$work/results.img"
	load=$(cut -d' ' -f1-3 /proc/loadavg)
	if [[ -f $out/summary.tsv ]]; then
		boot=$(cat "$out/boot" 2>/dev/null || echo '?')
		say "$kver: init after $boot s, whole boot ${took} s (load average now $load)"
		while IFS=$'\t' read -r label rc secs summary; do
			if [[ $rc == 0 ]]; then
				line PASS "$kver" "$label" "$summary (${secs} s)"
			else
				line FAIL "$kver" "$label" "$summary (exit $rc, ${secs} s); see $out/$(tr ' /' '__' <<<"$label").log"
				grep -E '^test .* FAILED$|^ktproxy: error' "$out/$(tr ' /' '__' <<<"$label").log" |
					sort -u | head -n 10 | sed 's/^/    /' || true
			fi
		done <"$out/summary.tsv"
	fi
	# The guest writes its results after each test executable, and marks
	# the end: without the mark, say where it stopped.
	if [[ ! -f $out/complete ]]; then
		why="no results"
		[[ -f $out/summary.tsv ]] && why="results end early"
		why+=" (qemu exit $rc after ${took} s)"
		[[ $rc -eq 124 ]] && why+=": the boot timed out (VMTEST_TIMEOUT=$vm_timeout)"
		running=$(sed -n 's/^vmtest-init: running //p' "$out/console.log" 2>/dev/null | tail -n 1)
		[[ -n $running ]] && why+="; it was running $running"
		line FAIL "$kver" boot "$why; see $out/console.log"
		tail -n 15 "$out/console.log" | sed 's/^/    /'
	fi
done

for sk in "${skipped[@]}"; do
	echo "vmtest: SKIP (every kernel) ${sk}"
done
echo "vmtest: logs in $logs"
echo "vmtest: $passed passed, $failed failed, ${#skipped[@]} test(s) skipped"
[[ $failed -eq 0 ]]
