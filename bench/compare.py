#!/usr/bin/env python3
"""Reproducibility across full runs: each cell's mean in every run (raw CSVs of
bench/run.sh), and how far a run's mean lies from the mean of all runs. Usage:
compare.py RAW.csv RAW.csv [...]  (Markdown on stdout)

Loss cells are left out: near 0 %, a relative spread means nothing."""

import csv
import sys
from collections import defaultdict

LIMIT = 10.0  # % (the goal in bench/README.md)
runs = sys.argv[1:]
if len(runs) < 2:
    sys.exit(__doc__)

means = defaultdict(dict)  # (backend, mtu, case) -> {run index: mean}
units = {}
for i, path in enumerate(runs):
    vals = defaultdict(list)
    for r in csv.DictReader(open(path)):
        if r["value"] and not r["case"].endswith("_loss"):
            vals[(r["backend"], r["mtu"], r["case"])].append(float(r["value"]))
            units[r["case"]] = r["unit"]
    for key, v in vals.items():
        means[key][i] = sum(v) / len(v)

print(f"Runs: {', '.join(runs)}\n")
print("| back-end | case | MTU | unit | " + " | ".join(f"run {i + 1}" for i in range(len(runs)))
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
