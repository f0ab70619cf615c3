#!/usr/bin/env python3
"""CPU time the rest of the machine takes while the benchmark runs: it shares the CPUs
with whatever else runs here, and a repetition measured while something else was busy is
not comparable. Usage: cpuload.py snap  (prints one line: a snapshot), cpuload.py since
'SNAPSHOT' (prints the CPUs, on average, that processes outside the benchmark used since;
"outside" = not in this user namespace, kernel threads excluded: they do our packets' work
too; plus the time the hypervisor ran something else on our virtual CPUs, "steal" in
/proc/stat, which no process here shows)."""

import os
import sys
import time

HZ = os.sysconf("SC_CLK_TCK")
OURS = os.readlink("/proc/self/ns/user")
PF_KTHREAD = 0x00200000


def snap():
    ours = others = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                s = f.read()
        except OSError:
            continue
        f = s[s.rindex(")") + 2:].split()
        if int(f[6]) & PF_KTHREAD:
            continue
        # utime stime cutime cstime: reaped children count in their parent.
        t = int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
        try:
            mine = os.readlink(f"/proc/{pid}/ns/user") == OURS
        except OSError:
            mine = False  # not ours to look at: another user namespace's
        if mine:
            ours += t
        else:
            others += t
    with open("/proc/stat") as f:
        # cpu user nice system idle iowait irq softirq steal ...
        others += int(f.readline().split()[8])
    return f"{time.monotonic():.3f} {others}"


if sys.argv[1] == "snap":
    print(snap())
else:
    t0, o0 = sys.argv[2].split()
    t1, o1 = snap().split()
    dt = float(t1) - float(t0)
    print(f"{max(0, int(o1) - int(o0)) / HZ / dt:.2f}" if dt > 0 else "0")
