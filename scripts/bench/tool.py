#!/usr/bin/env python3
"""Small helpers for scripts/bench.sh (parsing and the final table).

  tool.py free-ports K               K distinct free loopback TCP ports
  tool.py iperf FILE                 "GBIT_PER_S BYTES" from iperf3 -J output
  tool.py bpf-delta IDS BEFORE AFTER CONNS
                                     metric lines for ktproxy's BPF programs:
                                     IDS is a comma list of program ids (the
                                     ones ktproxy holds), BEFORE/AFTER are
                                     `bpftool -j prog show` outputs
  tool.py rules FILE N               writes N distinct IPv4 CIDRs (a rule file)
  tool.py startup KTPROXY ARGS...    milliseconds from starting KTPROXY ARGS to
                                     its ready line (then SIGTERM); at most 60 s
  tool.py report RESULTS MODES TITLE
                                     Markdown table of medians from the
                                     results file (lines: run mode metric value)
"""

import json
import os
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import time

READY = "ktproxy ready: listening on "  # src/logline.rs


def free_ports(k):
    socks = []
    for _ in range(k):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    print(" ".join(str(s.getsockname()[1]) for s in socks))


def iperf(path):
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        print(f"unreadable iperf3 output: {e}")
        return 1
    if data.get("error"):
        print(data["error"])
        return 1
    try:
        rx = data["end"]["sum_received"]
    except KeyError:
        print("no end.sum_received in iperf3 output")
        return 1
    print(f'{rx["bits_per_second"] / 1e9:.4f} {int(rx["bytes"])}')
    return 0


def _progs(path, ids):
    with open(path) as f:
        data = json.load(f)
    out = {}
    for p in data:
        if p.get("id") in ids and str(p.get("name", "")).startswith("ktproxy_"):
            out[p["id"]] = p
    return out


def bpf_delta(ids_arg, before, after, conns):
    ids = {int(x) for x in ids_arg.split(",") if x}
    b = _progs(before, ids)
    a = _progs(after, ids)
    conns = float(conns)
    total_ns = 0
    for pid, p in sorted(a.items(), key=lambda kv: kv[1]["name"]):
        # bpftool leaves both fields out while they are zero.
        old = b.get(pid, {})
        runs = p.get("run_cnt", 0) - old.get("run_cnt", 0)
        ns = p.get("run_time_ns", 0) - old.get("run_time_ns", 0)
        total_ns += ns
        name = p["name"]
        print(f"bpf.{name}.runs {runs}")
        if runs > 0:
            print(f"bpf.{name}.ns_per_run {ns / runs:.1f}")
            if conns > 0:
                print(f"bpf.{name}.runs_per_conn {runs / conns:.3f}")
    if conns > 0 and a:
        print(f"bpf_total_ns_per_conn {total_ns / conns:.1f}")
    return 0


def rules(path, n):
    """N distinct networks: /24s of 10.0.0.0/8, as a long exclusion list."""
    with open(path, "w") as f:
        f.write("# %d generated networks\n" % n)
        for i in range(n):
            f.write("10.%d.%d.0/24\n" % (i // 256 % 256, i % 256))


def startup(argv):
    """Spawn to ready line, in ms; the process is stopped (SIGTERM) after."""
    t0 = time.monotonic()
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    sel = selectors.DefaultSelector()
    sel.register(p.stderr, selectors.EVENT_READ)
    buf, ms, deadline = b"", None, t0 + 60
    while ms is None and time.monotonic() < deadline:
        if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
            break
        chunk = os.read(p.stderr.fileno(), 65536)
        if not chunk:
            break
        buf += chunk
        if READY.encode() in buf:
            ms = (time.monotonic() - t0) * 1000
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(timeout=10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    if ms is None:
        print("no ready line: " + buf.decode(errors="replace")[-500:].replace("\n", " | "))
        return 1
    print("%.1f" % ms)
    return 0


# key, label, decimals, ratio-to-direct makes sense, aggregate
METRICS = [
    ("iperf1_gbps", "iperf3, 1 stream (Gbit/s)", 2, True, "median"),
    ("iperf4_gbps", "iperf3, 4 streams (Gbit/s)", 2, True, "median"),
    ("close_rps", "new connections/s (wrk -t2 -c32, `Connection: close`)", 0, True, "median"),
    ("close_errors", "↳ wrk socket errors connect/read/write/timeout (sum of runs)", None, False, "errors:close"),
    ("close_non2xx", "↳ wrk non-2xx responses (sum of runs)", 0, False, "sum"),
    ("ka_rps", "keep-alive requests/s (wrk -t2 -c8)", 0, True, "median"),
    ("ka_p50_us", "↳ keep-alive latency p50 (µs)", 0, True, "median"),
    ("ka_p99_us", "↳ keep-alive latency p99 (µs)", 0, True, "median"),
    ("ka_errors", "↳ wrk socket errors connect/read/write/timeout (sum of runs)", None, False, "errors:ka"),
    ("ka_non2xx", "↳ wrk non-2xx responses (sum of runs)", 0, False, "sum"),
    ("cpu_per_conn_us", "proxy CPU per new connection (µs, user+sys)", 1, False, "median"),
    ("cpu_per_ka_req_us", "proxy CPU per keep-alive request (µs)", 2, False, "median"),
    ("cpu_per_gib_ms", "proxy CPU per GiB relayed, iperf3 1 stream (ms)", 0, False, "median"),
    ("kworker_per_conn_us", "kernel workers' CPU per new connection (µs; every kworker, machine-wide)", 1, False, "median"),
    ("kworker_per_ka_req_us", "kernel workers' CPU per keep-alive request (µs; machine-wide)", 2, False, "median"),
    ("kworker_per_gib_ms", "kernel workers' CPU per GiB, iperf3 1 stream (ms; machine-wide)", 0, False, "median"),
    ("idle_total_kib", "memory per idle connection, incl. client and server sockets (KiB)", 1, True, "median"),
    ("idle_overhead_kib", "↳ proxy's cost per connection: the above minus direct (KiB)", 1, False, "median"),
    ("idle_pss_kib", "↳ of it, proxy process Pss (KiB)", 1, False, "median"),
    ("idle_kernel_kib", "↳ of it, kernel: stacks + page tables + slab (KiB)", 1, False, "median"),
    ("idle_fds_per_conn", "proxy open files per idle connection", 2, False, "median"),
    ("idle_threads", "proxy threads while holding the idle connections", 0, False, "median"),
    ("idle_failures", "idle connections that failed to establish (sum of runs)", 0, False, "sum"),
    ("idle_secs", "seconds to establish all idle connections", 2, True, "median"),
    ("bpf_total_ns_per_conn", "BPF programs, total run time per new connection (ns)", 0, False, "median"),
    ("dns_p50_us", "DNS: A for a cached name, latency p50 (µs, sequential)", 1, False, "median"),
    ("dns_p99_us", "↳ latency p99 (µs)", 1, False, "median"),
    ("dns_qps", "DNS: A queries/s, one responder thread (16 in flight)", 0, False, "median"),
    ("dns_lost", "↳ queries without a reply (sum of runs)", 0, False, "sum"),
    ("dns_pss_kib", "DNS: responder Pss growth over the distinct names (KiB)", 0, False, "median"),
    ("dns_bytes_per_name", "↳ per name kept (table of 65,536; bytes)", 0, False, "median"),
    ("startup_ms", "start-up: spawn to ready line (ms)", 0, False, "median"),
    ("startup_rules_ms", "↳ with 10,000 `--exclude-file` CIDRs (ms; target < 1,000)", 0, False, "median"),
]


def fmt(v, decimals):
    if v is None:
        return "–"
    if decimals is None:
        return str(v)
    return f"{v:,.{decimals}f}"


def derive(data, modes):
    """Per-run idle-memory figures relative to the direct run of the same run
    number, so client and server sockets cancel out."""
    d = data.get
    for m in modes:
        for run, pss in d((m, "idle_pss_raw_kib"), {}).items():
            kern = d((m, "idle_kern_raw_kib"), {}).get(run)
            if kern is None:
                continue
            data.setdefault((m, "idle_total_kib"), {})[run] = pss + kern
            base = d(("direct", "idle_kern_raw_kib"), {}).get(run)
            if m == "direct" or base is None:
                continue
            data.setdefault((m, "idle_pss_kib"), {})[run] = pss
            data.setdefault((m, "idle_kernel_kib"), {})[run] = kern - base
            data.setdefault((m, "idle_overhead_kib"), {})[run] = pss + kern - base


def report(path, modes_arg, title):
    modes = modes_arg.split(",")
    data = {}  # (mode, metric) -> {run: value}
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) != 4:
                continue
            run, mode, metric, value = parts
            try:
                data.setdefault((mode, metric), {})[run] = float(value)
            except ValueError:
                continue
    derive(data, modes)

    def agg(mode, metric, how):
        if how.startswith("errors:"):
            w = how.split(":")[1]
            parts = []
            for e in ("connect", "read", "write", "timeout"):
                ys = data.get((mode, f"{w}_err_{e}"))
                if ys is None:
                    return None
                parts.append(str(int(sum(ys.values()))))
            return "/".join(parts)
        xs = list(data.get((mode, metric), {}).values())
        if not xs:
            return None
        if how == "sum":
            return sum(xs)
        return statistics.median(xs)

    rows = []
    for key, label, dec, ratio, how in METRICS:
        cells = {m: agg(m, key, how) for m in modes}
        if all(c is None for c in cells.values()):
            continue
        base = cells.get("direct")
        hap = cells.get("haproxy")
        ratios, vs_hap = {}, {}
        for m in modes:
            c = cells[m]
            ok = ratio and isinstance(c, float) and isinstance(base, float) and base
            ratios[m] = c / base if ok else None
            ok = ratio and isinstance(c, float) and isinstance(hap, float) and hap
            vs_hap[m] = c / hap if ok else None
        rows.append((label, {m: fmt(c, dec) for m, c in cells.items()}, ratios, vs_hap))
    # Per-program BPF rows, for the programs that ran.
    progs = sorted({k.split(".")[1] for (_, k) in data if k.startswith("bpf.") and k.endswith(".ns_per_run")})
    for name in progs:
        cells = {}
        for m in modes:
            ns = agg(m, f"bpf.{name}.ns_per_run", "median")
            per = agg(m, f"bpf.{name}.runs_per_conn", "median")
            cells[m] = "–" if ns is None or per is None else f"{ns:,.0f} ns × {per:.2f}"
        rows.append((f"↳ `{name}`: ns per run × runs per connection", cells, {}, {}))

    runs = sorted({r for xs in data.values() for r in xs})
    if len(runs) > 1:
        print("Per-run values (by run number):", file=sys.stderr)
        for (mode, metric), xs in sorted(data.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            print(f"  {metric:40s} {mode:8s} " + ", ".join(f"{xs[r]:g}" for r in sorted(xs)), file=sys.stderr)
        print(file=sys.stderr)
        sys.stderr.flush()

    out = [title, ""]
    # ktproxy's columns also get their ratio to haproxy, when it ran.
    with_hap = [m for m in modes if m not in ("direct", "haproxy") and "haproxy" in modes]
    head = "| metric | direct |"
    sep = "|---|---:|"
    for m in modes:
        if m != "direct":
            head += f" {m} | ratio |" + (" ÷ haproxy |" if m in with_hap else "")
            sep += "---:|---:|" + ("---:|" if m in with_hap else "")
    out += [head, sep]
    for label, cells, ratios, vs_hap in rows:
        line = f"| {label} | {cells.get('direct', '–')} |"
        for m in modes:
            if m != "direct":
                r = ratios.get(m)
                line += f" {cells.get(m, '–')} | {f'{r:.2f}×' if r is not None else ''} |"
                if m in with_hap:
                    h = vs_hap.get(m)
                    line += f" {f'{h:.2f}×' if h is not None else ''} |"
        out.append(line)
    print("\n".join(out))
    return 0


def main(argv):
    cmd = argv[1] if len(argv) > 1 else ""
    if cmd == "free-ports" and len(argv) == 3:
        free_ports(int(argv[2]))
        return 0
    if cmd == "iperf" and len(argv) == 3:
        return iperf(argv[2])
    if cmd == "bpf-delta" and len(argv) == 6:
        return bpf_delta(*argv[2:])
    if cmd == "rules" and len(argv) == 4:
        rules(argv[2], int(argv[3]))
        return 0
    if cmd == "startup" and len(argv) >= 3:
        return startup(argv[2:])
    if cmd == "report" and len(argv) == 5:
        return report(*argv[2:])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
