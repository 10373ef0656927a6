#!/usr/bin/env python3
"""Print the benchmark results (bench/run.sh's results.jsonl) as a Markdown
report: the machine, a table per run, and how mailbridge compares with the
targets and with Postfix. Informational only: the exit status is always 0."""

import argparse
import json
import os
import platform
import statistics
import subprocess


def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except Exception:
        return "?"


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def mem_total_gib():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1048576, 1)
    except OSError:
        pass
    return "?"


def fs_type():
    d = os.environ.get("BENCH_TMPDIR", "/var/tmp")
    out = sh(f"df -PT {d}").splitlines()
    return out[1].split()[1] if len(out) > 1 else "?"


def mib(kib):
    return f"{kib / 1024:.1f}" if kib else "–"


def fmt(v, nd=0):
    if v is None:
        return "–"
    return f"{v:.{nd}f}"


def peak_rss(r):
    """Peak RSS in KiB: mailbridge's own VmHWM; for Postfix, the largest sum of
    VmHWM over its live processes seen by the sampler."""
    if r.get("peak_rss_kib_vmhwm"):
        return r["peak_rss_kib_vmhwm"]
    return r.get("peak_sum_vmhwm_kib")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--date", default="?")
    ap.add_argument("--commit", default="?")
    ap.add_argument("--command", default="bash bench/run.sh")
    ap.add_argument("--postfix-version", default="?")
    a = ap.parse_args()

    runs = []
    with open(a.results) as f:
        for line in f:
            line = line.strip()
            if line:
                runs.append(json.loads(line))

    print()
    print("## mailbridge benchmark results")
    print()
    print(f"- date: {a.date}; commit: {a.commit}; command: `{a.command}`")
    print(f"- machine: {os.cpu_count()} CPU(s), {cpu_model()}, {mem_total_gib()} GiB RAM, "
          f"kernel {platform.release()}; filesystem of the spool/queue: "
          f"{fs_type()}")
    print(f"- Postfix {a.postfix_version}; {sh('rustc --version')}")
    print("- load generator, relay and sink share the same CPUs (loopback)")
    print()
    def med(relay, sess, key, rs=None):
        vals = [r.get(key) for r in (rs or runs)
                if r["relay"] == relay and r["sessions"] == sess and r.get(key) is not None
                and not r.get("errors")]
        return statistics.median(vals) if vals else None

    for r in runs:
        r["peak_rss_kib"] = peak_rss(r)

    relays = list(dict.fromkeys(r["relay"] for r in runs))
    sessions = sorted({r["sessions"] for r in runs}, reverse=True)
    print("Summary (median of the complete runs of each scenario):")
    print()
    print("| relay | sessions | runs | ingest msg/s | end-to-end msg/s | CPU ms/msg | peak RSS MiB | Σ PSS MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for s in sessions:
        for rl in relays:
            n = sum(1 for r in runs if r["relay"] == rl and r["sessions"] == s and not r.get("errors"))
            tot = sum(1 for r in runs if r["relay"] == rl and r["sessions"] == s)
            print(f"| {rl} | {s} | {n}/{tot} | {fmt(med(rl, s, 'ingest_msg_s'))} | "
                  f"{fmt(med(rl, s, 'e2e_msg_s'))} | {fmt(med(rl, s, 'cpu_ms_per_msg'), 3)} | "
                  f"{mib(med(rl, s, 'peak_rss_kib'))} | {mib(med(rl, s, 'peak_sum_pss_kib'))} |")
    print()
    print("All runs:")
    print()
    print("| run | msgs | ingest msg/s | end-to-end msg/s | CPU ms/msg | peak RSS MiB | Σ PSS MiB | received | left in queue | busy before % | machine busy % | other CPU ms | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in runs:
        errs = "; ".join(r.get("errors") or []) or ""
        print(f"| {r.get('run', r['relay'] + '-s' + str(r['sessions']))} | {r['messages']} | "
              f"{fmt(r.get('ingest_msg_s'))} | {fmt(r.get('e2e_msg_s'))} | "
              f"{fmt(r.get('cpu_ms_per_msg'), 3)} | {mib(r.get('peak_rss_kib'))} | "
              f"{mib(r.get('peak_sum_pss_kib'))} | "
              f"{r.get('sink_received', '–')} | {r.get('queue_files_left', '–')} | "
              f"{fmt(r.get('busy_pct_before'))} | "
              f"{fmt(r.get('machine_busy_pct'))} | {fmt(r.get('other_cpu_ms'))} | {errs} |")
    print()
    print("peak RSS: mailbridge = VmHWM of its process at the end of the run (fresh process per run);")
    print("Postfix = max over 250 ms samples of Σ VmHWM of its live processes (shared pages counted")
    print("once per process). Σ PSS = max over 1 s samples of Σ Pss (shared pages split between")
    print("processes). machine busy = all CPUs, whole machine, during the run; other CPU = machine")
    print("busy time minus relay, smtp-source, smtp-sink and the measuring script (kernel I/O")
    print("threads and whatever else runs on the machine); busy before = the machine in the 1 s")
    print("before the run (the run waits, within limits, for that to be ≤ 15 %).")

    # Every byte intact (run.sh --verify / --large)
    checked = [r for r in runs if "intact" in r or "verify_error" in r]
    if checked:
        print()
        print("Byte check (--verify: each message's body at the sink against smtp-source's, SHA-256):")
        print()
        print("| run | message body bytes | ingest s | end-to-end s | intact | damaged | missing | peak RSS MiB | Σ PSS MiB |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in checked:
            print(f"| {r.get('run')} | {r.get('body_bytes', '–')} | {fmt(r.get('ingest_s'), 1)} | "
                  f"{fmt(r.get('e2e_s'), 1)} | {r.get('intact', '–')} | "
                  f"{r.get('damaged', '–')} | {r.get('missing', '–')} | "
                  f"{mib(r.get('peak_rss_kib'))} | {mib(r.get('peak_sum_pss_kib'))} |"
                  + (f" {r['verify_error']}" if r.get("verify_error") else ""))

    # Postfix CPU breakdown
    pf = [r for r in runs if r["relay"] == "postfix" and r.get("cpu_breakdown_ms")]
    if pf:
        print()
        print("Postfix CPU by process (ms over the run; reaped = daemons that exited, via master's cutime+cstime):")
        for r in pf:
            parts = ", ".join(f"{k} {v}" for k, v in sorted(r["cpu_breakdown_ms"].items(),
                                                          key=lambda kv: -kv[1]))
            print(f"- {r.get('run')}: {parts}; up to {r.get('max_live_processes')} "
                  f"live processes, {r.get('processes_seen')} seen")

    # Comparison with the targets (informational)
    lines = []
    for s in sessions:
        mb_e2e = med("mailbridge", s, "e2e_msg_s")
        pf_e2e = med("postfix", s, "e2e_msg_s")
        mb_cpu = med("mailbridge", s, "cpu_ms_per_msg")
        mb_rss = med("mailbridge", s, "peak_rss_kib")
        if mb_e2e is None:
            lines.append(f"- {s} session(s): mailbridge has no complete run")
            continue
        ratio = f"{mb_e2e / pf_e2e:.2f}× Postfix" if pf_e2e else "no Postfix figure"
        lines.append(
            f"- {s} session(s): end-to-end {mb_e2e:.0f} msg/s = {ratio} (target ≥ 2× at 20 sessions); "
            f"CPU {mb_cpu:.3f} ms/msg (target ≤ 0.5); peak RSS {mib(mb_rss)} MiB (target ≤ 30 MB)")
    if lines:
        print()
        print("mailbridge against the targets (median of complete runs; informational, not asserted):")
        print("\n".join(lines))


if __name__ == "__main__":
    main()
