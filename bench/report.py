#!/usr/bin/env python3
"""Turns the raw CSV of one bench/run.sh run into a Markdown report, a summary CSV and PNG
plots (gnuplot). Usage: report.py RAW.csv MACHINE.txt OUTDIR STAMP"""

import csv
import os
import shutil
import subprocess
import sys
from collections import OrderedDict, defaultdict

raw, machine, outdir, stamp = sys.argv[1:5]
ORDER = ["ref-machine", "ref-loopback", "ref-veth", "passt-rs-vhost", "passt-rs-stream",
         "passt-debian", "slirp4netns", "compare"]
BASELINE = "passt-debian"
# CPUs that processes outside the benchmark used during a repetition (bench/cpuload.py)
# above which its cell is marked as measured on a busy machine.
BUSY = 0.25  # = BUSY_CPU in suite.sh

vals = defaultdict(list)        # (backend, mtu, case) -> [value]
cpu = defaultdict(lambda: [0.0, 0])  # (backend, mtu, case) -> [cpu s, bytes]
units = {}
notes = {}                      # (backend, mtu, case) -> reason
other = defaultdict(list)       # (backend, mtu, case) -> [CPUs used outside, per rep]
backends = set()
for r in csv.DictReader(open(raw)):
    b, m, c = r["backend"], r["mtu"], r["case"]
    backends.add(b)
    key = (b, m, c)
    if r["value"]:
        vals[key].append(float(r["value"]))
        units[c] = r["unit"]
        if r.get("other_cpu"):
            other[key].append(float(r["other_cpu"]))
        if r["backend_cpu_s"] and r["bytes"]:
            cpu[key][0] += float(r["backend_cpu_s"])
            cpu[key][1] += int(float(r["bytes"]))
    else:
        notes.setdefault(key, r["unit"])
# Back-ends that were not available at all get no column (they are listed at the end).
absent = {k[0] for k in notes if k[2] == "available"}
backends -= absent
cols = [b for b in ORDER if b in backends] + sorted(backends - set(ORDER))


def stats(v):
    """Mean, the largest deviation from it and the range (max − min), both in % of it."""
    mean = sum(v) / len(v)
    if not mean:
        return mean, 0.0, 0.0
    dev = max(abs(x - mean) for x in v) / mean * 100
    return mean, dev, (max(v) - min(v)) / mean * 100


def median(v):
    s = sorted(v)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def busy(key):
    return max(other.get(key, [0])) >= BUSY


def fmt(x):
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.2f}" if abs(x) < 10 else f"{x:.1f}"


def mtus_of(case):
    ms = sorted({k[1] for k in list(vals) + list(notes) if k[2] == case},
                key=lambda m: (m == "-", -int(m) if m.isdigit() else 0))
    return ms


CASES = (["tcp_up_P1", "tcp_up_P4", "tcp_down_P1", "tcp_down_P4", "udp_up", "udp_up_loss",
          "udp_down", "udp_down_loss", "tcp_rr", "tcp_rr_lat", "tcp_crr", "tcp_crr_lat",
          "icmp_rtt", "rss_idle", "memcpy"]
         + sorted({k[2] for k in list(vals) + list(notes) if k[2].startswith("flows_")}))
TITLES = {
    "tcp_up_P1": "TCP guest→peer, 1 stream", "tcp_up_P4": "TCP guest→peer, 4 streams",
    "tcp_down_P1": "TCP peer→guest, 1 stream", "tcp_down_P4": "TCP peer→guest, 4 streams",
    "udp_up": "UDP guest→peer", "udp_up_loss": "UDP guest→peer loss",
    "udp_down": "UDP peer→guest", "udp_down_loss": "UDP peer→guest loss",
    "tcp_rr": "TCP_RR (1 B)", "tcp_rr_lat": "TCP_RR mean latency", "tcp_crr": "TCP_CRR",
    "tcp_crr_lat": "TCP_CRR mean time", "icmp_rtt": "ICMP echo RTT (middle half)", "rss_idle": "back-end RSS, idle",
    "memcpy": "memory copy, 256 KiB blocks (the machine)",
}


def title(case):
    if case in TITLES:
        return TITLES[case]
    parts = case.split("_")
    if len(parts) == 2 and parts[0] == "flows":
        return f"{parts[1]} idle flows"
    if case.endswith("_setup"):
        return f"{parts[1]} idle flows: setup rate"
    if case.endswith("_rss_delta"):
        return f"{parts[1]} idle flows: back-end RSS growth"
    if case.endswith("_rss"):
        return f"{parts[1]} idle flows: back-end RSS"
    return case


def cell(b, m, c):
    key = (b, m, c)
    if key in vals:
        mean, dev, _ = stats(vals[key])
        n = len(vals[key])
        mark = "*" if busy(key) else ""
        return (f"{fmt(mean)} ±{dev:.0f}%" if n > 1 else fmt(mean)) + mark
    for k in (key, (b, m, "attach")):
        if k in notes:
            why = notes[k]
            return "n/s" if why.startswith("unsupported") else "err"
    return ""


lines = []
lines.append(f"# passt-rs benchmark, {stamp}\n")
lines.append("```")
lines.append(open(machine).read().rstrip())
lines.append("```\n")
lines.append("Mean over repetitions, ±: the largest deviation of a repetition from that mean "
             "(the range, max−min, is in summary.csv). n/s: not supported by that "
             "back-end (yet); err: the case failed; blank: not run for that back-end. "
             "Throughput in Mbit/s, rates per second, times in µs.\n")
loads = [x for v in other.values() for x in v]
if loads:
    nbusy = sum(1 for k in vals if busy(k))
    lines.append(f"Processes outside the benchmark used {sum(loads) / len(loads):.2f} CPUs on "
                 f"average during the repetitions (max {max(loads):.2f}); *: a repetition of "
                 f"that cell ran while they used {BUSY} CPUs or more ({nbusy} of {len(vals)} "
                 "cells): its spread says more about the machine than about the back-end.\n")
if len(vals.get(("ref-machine", "-", "memcpy"), [])) > 1:
    mean, dev, _ = stats(vals[("ref-machine", "-", "memcpy")])
    lines.append(f"The machine itself: copying memory ran at {fmt(mean)} GB/s ±{dev:.0f}% over "
                 "the repetitions (ref-machine, measured in each; nothing but the machine "
                 "moves it).\n")
head = "| case | MTU | unit | " + " | ".join(cols) + " |"
lines.append(head)
lines.append("|" + "---|" * (3 + len(cols)))
summary = [["case", "mtu", "unit", "backend", "mean", "median", "min", "max", "dev_pct",
            "range_pct", "n", "cpu_s_per_gb", "other_cpu_max"]]
for c in CASES:
    for m in mtus_of(c):
        row = [cell(b, m, c) for b in cols]
        if not any(row):
            continue
        lines.append(f"| {title(c)} | {m} | {units.get(c, '')} | " + " | ".join(row) + " |")
        for b in cols:
            v = vals.get((b, m, c))
            if v:
                mean, dev, rng = stats(v)
                cs, by = cpu.get((b, m, c), (0, 0))
                o = other.get((b, m, c))
                summary.append([c, m, units.get(c, ""), b, f"{mean:.2f}", f"{median(v):.2f}",
                                f"{min(v):.2f}", f"{max(v):.2f}", f"{dev:.1f}", f"{rng:.1f}",
                                len(v),
                                f"{cs / by * 1e9:.2f}" if by else "",
                                f"{max(o):.2f}" if o else ""])

# CPU per GB moved and ratios: back-ends only (the references have neither).
be_cols = [b for b in cols if not b.startswith("ref-")]
cpu_rows = []
for c in CASES:
    if not c.startswith(("tcp_up", "tcp_down", "udp_up", "udp_down")) or c.endswith("loss"):
        continue
    for m in mtus_of(c):
        row = []
        for b in be_cols:
            cs, by = cpu.get((b, m, c), (0, 0))
            row.append(f"{cs / by * 1e9:.2f}" if by else "")
        if any(row):
            cpu_rows.append(f"| {title(c)} | {m} | " + " | ".join(row) + " |")
if cpu_rows:
    lines.append("\n## Back-end CPU time per GB moved (user+system seconds)\n")
    lines.append("| case | MTU | " + " | ".join(be_cols) + " |")
    lines.append("|" + "---|" * (2 + len(be_cols)))
    lines += cpu_rows

# Ratios to the baseline back-end.
if BASELINE in be_cols:
    ratio_rows = []
    for c in ["tcp_up_P1", "tcp_up_P4", "tcp_down_P1", "tcp_down_P4", "udp_up", "udp_down",
              "tcp_rr", "tcp_crr"]:
        for m in mtus_of(c):
            base = vals.get((BASELINE, m, c))
            if not base:
                continue
            bm = stats(base)[0]
            row = []
            for b in be_cols:
                v = vals.get((b, m, c))
                row.append(f"{stats(v)[0] / bm:.2f}×" if v and bm else "")
            ratio_rows.append(f"| {title(c)} | {m} | " + " | ".join(row) + " |")
    if ratio_rows:
        lines.append(f"\n## Ratios to {BASELINE} (higher is better)\n")
        lines.append("| case | MTU | " + " | ".join(be_cols) + " |")
        lines.append("|" + "---|" * (2 + len(be_cols)))
        lines += ratio_rows

reasons = sorted({(k[0], v) for k, v in notes.items()})
if reasons:
    lines.append("\n## Not measured\n")
    for b, why in reasons:
        lines.append(f"- {b}: {why}")

md = "\n".join(lines) + "\n"
open(os.path.join(outdir, f"results-{stamp}.md"), "w").write(md)
with open(os.path.join(outdir, f"summary-{stamp}.csv"), "w", newline="") as f:
    csv.writer(f).writerows(summary)

# Plots: TCP throughput per back-end, one PNG per MTU.
if shutil.which("gnuplot"):
    tcp = ["tcp_up_P1", "tcp_up_P4", "tcp_down_P1", "tcp_down_P4"]
    for m in sorted({k[1] for k in vals if k[2] in tcp and k[1] != "-"}):
        plot_cols = [b for b in cols if any((b, m, c) in vals for c in tcp)]
        refs = [b for b in cols if b.startswith("ref-") and any((b, "-", c) in vals for c in tcp)]
        if not plot_cols:
            continue
        dat = os.path.join(outdir, f".plot-{m}.dat")
        with open(dat, "w") as f:
            f.write("case " + " ".join(refs + plot_cols) + "\n")
            for c in tcp:
                row = [stats(vals[(b, "-", c)])[0] / 1000 if (b, "-", c) in vals else 0
                       for b in refs]
                row += [stats(vals[(b, m, c)])[0] / 1000 if (b, m, c) in vals else 0
                        for b in plot_cols]
                f.write(c.replace("_", "-") + " " + " ".join(f"{x:.3f}" for x in row) + "\n")
        n = len(refs) + len(plot_cols)
        png = os.path.join(outdir, f"tcp-throughput-mtu{m}.png")
        script = f"""
set terminal pngcairo size 1000,500 noenhanced
set output '{png}'
set title 'TCP throughput, guest MTU {m} (references: no back-end)'
set ylabel 'Gbit/s'
set style data histogram
set style histogram clustered gap 1
set style fill solid 0.8 border -1
set key outside right top
set grid ytics
set yrange [0:*]
plot for [i=2:{n + 1}] '{dat}' using i:xtic(1) title columnheader(i)
"""
        subprocess.run(["gnuplot"], input=script, text=True, check=False)
        os.unlink(dat)
        if os.path.exists(png):
            shutil.copy(png, os.path.join(outdir, f"tcp-throughput-mtu{m}-{stamp}.png"))
            os.replace(png, os.path.join(outdir, f"latest-tcp-throughput-mtu{m}.png"))
if "smoke" not in open(machine).read():
    shutil.copy(os.path.join(outdir, f"results-{stamp}.md"), os.path.join(outdir, "latest.md"))
print(f"report: {os.path.join(outdir, f'results-{stamp}.md')}", file=sys.stderr)
