#!/usr/bin/env python3
"""The machine's memory copy bandwidth: copies a 16 MiB buffer (past any cache here) for the
seconds given, prints GB/s. A reference for the throughput cases, which are copies too: its
spread over a run's repetitions is the machine's, not a back-end's. (bytearray slice
assignment is one memcpy, so Python adds nothing measurable at this block size.)
Usage: membw.py SECONDS"""

import sys
import time

SIZE = 16 << 20
src = bytearray(b"\1") * SIZE
dst = bytearray(SIZE)
seconds = float(sys.argv[1])
copies = 0
t0 = time.monotonic()
while True:
    dst[:] = src
    copies += 1
    t = time.monotonic()
    if t - t0 >= seconds:
        break
print(f"{copies * SIZE / (t - t0) / 1e9:.2f}")
