#!/usr/bin/env python3
"""Reproducibility across full runs: each cell's mean in every run (raw CSVs of
bench/run.sh), and how far a run's mean lies from the mean of all runs. Usage:
compare.py RAW.csv RAW.csv [...]  (Markdown on stdout)

Loss cells are left out: near 0 %, a relative spread means nothing. Each run's passt-rs
version and outside load come from the machine-STAMP.txt beside its raw-STAMP.csv: runs
of different code, or one measured beside someone's compile, compare something else."""

import csv
import os
import re
import sys
from collections import defaultdict

LIMIT = 10.0  # % (the goal in bench/README.md)
runs = sys.argv[1:]
if len(runs) < 2:
    sys.exit(__doc__)


def version(raw):
    machine = re.sub(r"raw-(\w+)\.csv$", r"machine-\1.txt", raw)
    if machine == raw or not os.path.exists(machine):
        return "?"
    m = re.search(r"^passt-rs: (.*)$", open(machine).read(), re.M)
    return m.group(1) if m else "?"


means = defaultdict(dict)  # (backend, mtu, case) -> {run index: mean}
units = {}
other = {}  # run index -> mean CPUs used outside the benchmark
for i, path in enumerate(runs):
    vals = defaultdict(list)
    load = []
    for r in csv.DictReader(open(path)):
        if r.get("other_cpu"):
            load.append(float(r["other_cpu"]))
        if r["value"] and not r["case"].endswith("_loss"):
            vals[(r["backend"], r["mtu"], r["case"])].append(float(r["value"]))
            units[r["case"]] = r["unit"]
    for key, v in vals.items():
        means[key][i] = sum(v) / len(v)
    other[i] = sum(load) / len(load) if load else 0.0

print("| run | raw | passt-rs | outside load (CPUs, mean) |\n|---|---|---|---|")
for i, path in enumerate(runs):
    print(f"| {i + 1} | {os.path.basename(path)} | {version(path)} | {other[i]:.2f} |")
print("\n| back-end | case | MTU | unit | " + " | ".join(f"run {i + 1}" for i in range(len(runs)))
      + " | ± |")
print("|" + "---|" * (5 + len(runs)))
within = defaultdict(lambda: [0, 0])  # back-end -> [cells within LIMIT, cells]
for key in sorted(means, key=lambda k: (k[0], k[2], k[1])):
    m = means[key]
    if len(m) < len(runs):
        continue
    grand = sum(m.values()) / len(m)
    dev = max(abs(x - grand) for x in m.values()) / grand * 100 if grand else 0.0
    backend, mtu, case = key
    within[backend][1] += 1
    within[backend][0] += dev <= LIMIT
    cells = " | ".join(f"{m[i]:,.1f}" for i in range(len(runs)))
    print(f"| {backend} | {case} | {mtu} | {units[case]} | {cells} | ±{dev:.1f}% |")
print("\n±: the largest deviation of one run's mean from the mean of all runs.\n")
for backend, (ok, n) in sorted(within.items()):
    print(f"- {backend}: {ok} of {n} cells within ±{LIMIT:.0f}%")
