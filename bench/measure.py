#!/usr/bin/env python3
"""One measured benchmark run: smtp-source -> relay -> smtp-sink.

Called by bench/run.sh once per (relay, sessions) scenario, after the relay
and the sink are up. It

  * snapshots the relay's CPU time (utime+stime from /proc/<pid>/stat; for a
    process tree, the root's cutime+cstime too, which holds the CPU time of the
    children it has already reaped),
  * starts smtp-source and times it (ingest),
  * follows smtp-sink's `-c` counter output (mesg=N, flushed on every ".")
    until N new messages have arrived (end-to-end),
  * samples the relay's memory every --sample-ms (VmHWM, VmRSS, Pss) meanwhile,
  * snapshots CPU again, waits --settle seconds and re-reads the sink counter
    (to see duplicates), and prints one JSON object on stdout.

It never asserts anything about the figures; it only fails (exit 2) when the
run itself could not be carried out (timeout, smtp-source error), and even
then prints what it measured.
"""

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import threading
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def read_stat(pid):
    """(comm, ppid, utime, stime, cutime, cstime, starttime) in ticks, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode("ascii", "replace")
    except OSError:
        return None
    # comm may contain spaces and parentheses: split at the last ')'.
    lpar = data.index("(")
    rpar = data.rindex(")")
    comm = data[lpar + 1 : rpar]
    rest = data[rpar + 2 :].split()
    # rest[0] is field 3 (state); field N is rest[N-3].
    ppid = int(rest[1])
    utime, stime, cutime, cstime = (int(x) for x in rest[11:15])
    starttime = int(rest[19])
    return comm, ppid, utime, stime, cutime, cstime, starttime


def cmdline_name(pid, comm):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        if argv and argv[0]:
            return os.path.basename(argv[0].decode("utf-8", "replace"))
    except OSError:
        pass
    return comm


def all_ppids():
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = read_stat(int(d))
            if st:
                out[int(d)] = st[1]
    return out


def tree(root):
    """root and all its live descendants."""
    ppids = all_ppids()
    children = {}
    for pid, ppid in ppids.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        if p in ppids or p == root:
            out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_snapshot(root, include_tree):
    """Total CPU ticks of the relay, plus a per-process-name breakdown."""
    pids = tree(root) if include_tree else [root]
    total = 0
    by_name = {}
    for pid in pids:
        st = read_stat(pid)
        if not st:
            continue
        comm, _ppid, u, s, cu, cs, _start = st
        name = cmdline_name(pid, comm)
        own = u + s
        by_name[name] = by_name.get(name, 0) + own
        total += own
        if pid == root and include_tree:
            # Children that exited and were reaped by the root (Postfix's
            # master reaps every daemon it spawns).
            by_name["(reaped children)"] = cu + cs
            total += cu + cs
    return total, by_name


def mem_of(pid, want_pss=True):
    """(VmHWM, VmRSS, Pss) in KiB for one process (None if gone)."""
    hwm = rss = pss = None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
                elif line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
    except OSError:
        return None
    try:
        if not want_pss:
            raise OSError
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
                    break
    except OSError:
        pass
    if hwm is None:  # kernel thread or zombie
        return None
    return hwm, rss, pss or 0


class MemSampler(threading.Thread):
    """Every interval: sum over the relay's live processes of VmHWM, VmRSS and
    Pss; keep the maximum of each sum, and the largest process count."""

    def __init__(self, root, include_tree, interval, pss_every):
        super().__init__(daemon=True)
        self.pss_every = pss_every  # Pss (smaps_rollup) is costly: every Nth sample
        self.root, self.include_tree, self.interval = root, include_tree, interval
        self.stop = threading.Event()
        self.max_hwm_sum = self.max_rss_sum = self.max_pss_sum = 0
        self.max_procs = 0
        self.samples = 0
        self.seen = set()  # (pid, starttime) of every process seen

    def sample(self, force_pss=False):
        pids = tree(self.root) if self.include_tree else [self.root]
        hwm = rss = pss = n = 0
        want_pss = force_pss or self.samples % self.pss_every == 0
        for pid in pids:
            m = mem_of(pid, want_pss)
            if m is None:
                continue
            st = read_stat(pid)
            if st:
                self.seen.add((pid, st[6]))
            hwm += m[0]
            rss += m[1]
            pss += m[2]
            n += 1
        self.max_hwm_sum = max(self.max_hwm_sum, hwm)
        self.max_rss_sum = max(self.max_rss_sum, rss)
        if want_pss:
            self.max_pss_sum = max(self.max_pss_sum, pss)
        self.max_procs = max(self.max_procs, n)
        self.samples += 1

    def run(self):
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(self.interval)


class SinkCounter:
    """Follows smtp-sink -c output: records separated by '\r', each like
    'sess=3 quit=3 mesg=5'."""

    RX = re.compile(rb"mesg=(\d+)")

    def __init__(self, path):
        self.path = path
        self.offset = 0
        self.value = 0
        self.buf = b""

    def poll(self):
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return self.value
        if data:
            self.offset += len(data)
            self.buf += data
            # keep only the possibly incomplete tail
            parts = re.split(rb"[\r\n]", self.buf)
            self.buf = parts[-1]
            for p in parts[:-1]:
                m = self.RX.search(p)
                if m:
                    self.value = max(self.value, int(m.group(1)))
        return self.value


def machine_cpu():
    """(busy, total) jiffies over all CPUs from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]  # idle + iowait
    total = sum(v[:8])  # up to steal; guest time is already in user
    return total - idle, total


def loadavg():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--relay", required=True)
    ap.add_argument("--relay-port", type=int, required=True)
    ap.add_argument("--pid", type=int, required=True, help="relay pid (root of tree)")
    ap.add_argument("--tree", action="store_true", help="count all descendants")
    ap.add_argument("--sink-out", required=True, help="smtp-sink -c stdout file")
    ap.add_argument("--messages", type=int, required=True)
    ap.add_argument("--sessions", type=int, required=True)
    ap.add_argument("--size", type=int, default=10240)
    ap.add_argument("--reuse", action="store_true", help="smtp-source -d")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--settle", type=float, default=2.0)
    ap.add_argument("--stall", type=float, default=10.0,
                    help="after smtp-source failed, stop once the sink is idle this long")
    ap.add_argument("--sample-ms", type=float, default=250)
    ap.add_argument("--pss-every", type=int, default=4)
    ap.add_argument("--source-log", required=True)
    ap.add_argument("--pids-file", required=True)
    ap.add_argument("--sink-pid", type=int, default=0)
    ap.add_argument("--quiet-pct", type=float, default=15.0,
                    help="start when the machine was at most this busy for 1 s")
    ap.add_argument("--quiet-wait", type=float, default=120.0,
                    help="... but wait no longer than this (s)")
    a = ap.parse_args()

    # Other work on the machine (builds, tests) skews every figure here: wait,
    # within limits, for a quiet second before starting.
    quiet_waited, busy_before = 0.0, None
    t_q = time.monotonic()
    while True:
        b0 = machine_cpu()
        time.sleep(1.0)
        b1 = machine_cpu()
        busy_before = 100.0 * (b1[0] - b0[0]) / max(1, b1[1] - b0[1])
        quiet_waited = time.monotonic() - t_q
        if busy_before <= a.quiet_pct or quiet_waited >= a.quiet_wait:
            break

    sink = SinkCounter(a.sink_out)
    base = sink.poll()
    sink0 = read_stat(a.sink_pid) if a.sink_pid else None
    load0 = loadavg()
    m0 = machine_cpu()
    cpu0, by0 = cpu_snapshot(a.pid, a.tree)
    sampler = MemSampler(a.pid, a.tree, a.sample_ms / 1000.0, a.pss_every)
    sampler.start()

    cmd = ["smtp-source", "-s", str(a.sessions), "-m", str(a.messages),
           "-l", str(a.size), "-f", "from@bench.local", "-t", "to@bench.local",
           "-M", "bench-client.local"]
    if a.reuse:
        cmd.append("-d")
    cmd.append(f"127.0.0.1:{a.relay_port}")
    errors = []
    t0 = time.monotonic()
    with open(a.source_log, "ab") as log:
        src = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    with open(a.pids_file, "a") as f:
        f.write(f"{src.pid}\n")
    deadline = t0 + a.timeout
    t_ingest = t_e2e = None
    src_rc = None
    got = 0
    last_got, last_change = -1, time.monotonic()
    while time.monotonic() < deadline:
        if src_rc is None:
            src_rc = src.poll()
            if src_rc is not None:
                t_ingest = time.monotonic() - t0
        got = sink.poll() - base
        if got != last_got:
            last_got, last_change = got, time.monotonic()
        if src_rc not in (None, 0) and time.monotonic() - last_change > a.stall:
            break  # smtp-source failed and nothing more arrives: stop waiting
        if got >= a.messages and t_e2e is None:
            t_e2e = time.monotonic() - t0
        if t_e2e is not None and src_rc is not None:
            break
        time.sleep(0.01)
    cpu1, by1 = cpu_snapshot(a.pid, a.tree)
    m1 = machine_cpu()
    load1 = loadavg()
    sink1 = read_stat(a.sink_pid) if a.sink_pid else None
    sampler.sample(force_pss=True)  # one last sample right at the end
    sampler.stop.set()
    sampler.join()
    if src_rc is None:
        errors.append(f"smtp-source still running after {a.timeout}s: killed")
        src.kill()
        src.wait()
    elif src_rc != 0:
        errors.append(f"smtp-source exited {src_rc} (see {a.source_log})")
    if t_e2e is None:
        errors.append(f"sink got {got}/{a.messages} messages")
    ru_me = resource.getrusage(resource.RUSAGE_SELF)
    ru_src = resource.getrusage(resource.RUSAGE_CHILDREN)  # smtp-source (reaped)
    me_ms = (ru_me.ru_utime + ru_me.ru_stime) * 1000
    src_ms = (ru_src.ru_utime + ru_src.ru_stime) * 1000
    sink_ms = ((sink1[2] + sink1[3]) - (sink0[2] + sink0[3])) * 1000.0 / CLK_TCK \
        if (sink0 and sink1) else None
    machine_ms = (m1[0] - m0[0]) * 1000.0 / CLK_TCK
    time.sleep(a.settle)
    final = sink.poll() - base

    # mailbridge: the process's own lifetime peak (fresh process per scenario).
    own = mem_of(a.pid)
    cpu_ms = (cpu1 - cpu0) * 1000.0 / CLK_TCK
    breakdown = {k: round((by1.get(k, 0) - by0.get(k, 0)) * 1000.0 / CLK_TCK)
                 for k in sorted(set(by0) | set(by1))}
    breakdown = {k: v for k, v in breakdown.items() if v}
    res = {
        "relay": a.relay,
        "sessions": a.sessions,
        "messages": a.messages,
        "size": a.size,
        "reuse_connections": a.reuse,
        "ingest_s": round(t_ingest, 3) if t_ingest else None,
        "e2e_s": round(t_e2e, 3) if t_e2e else None,
        "ingest_msg_s": round(a.messages / t_ingest, 1) if t_ingest else None,
        "e2e_msg_s": round(a.messages / t_e2e, 1) if t_e2e else None,
        "cpu_ms_total": round(cpu_ms),
        "cpu_ms_per_msg": round(cpu_ms / a.messages, 3),
        "cpu_breakdown_ms": breakdown if a.tree else None,
        "sink_received": final,
        "sink_received_at_e2e": got,
        "peak_rss_kib_vmhwm": own[0] if (own and not a.tree) else None,
        "peak_sum_vmhwm_kib": sampler.max_hwm_sum,
        "peak_sum_vmrss_kib": sampler.max_rss_sum,
        "peak_sum_pss_kib": sampler.max_pss_sum,
        "max_live_processes": sampler.max_procs,
        "processes_seen": len(sampler.seen),
        "mem_samples": sampler.samples,
        # CPU of everything else on the same CPUs during the run: this
        # measuring process (sampler included), smtp-source, smtp-sink, and
        # what is left of the machine's busy time ("other": other users of
        # the machine, kernel threads doing the relay's I/O, ...).
        "measure_cpu_ms": round(me_ms),
        "source_cpu_ms": round(src_ms),
        "sink_cpu_ms": round(sink_ms) if sink_ms is not None else None,
        "machine_busy_ms": round(machine_ms),
        "other_cpu_ms": round(machine_ms - cpu_ms - me_ms - src_ms - (sink_ms or 0)),
        # Whole machine during the run: how busy all CPUs were (relay, load
        # generator, sink and anything else running), and the load average.
        "machine_busy_pct": round(100.0 * (m1[0] - m0[0]) / max(1, m1[1] - m0[1]), 1),
        "loadavg_before_after": [load0, load1],
        "busy_pct_before": round(busy_before, 1),
        "waited_for_quiet_s": round(quiet_waited, 1),
        "errors": errors,
    }
    print(json.dumps(res))
    sys.exit(2 if errors else 0)


if __name__ == "__main__":
    main()
