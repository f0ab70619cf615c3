#!/usr/bin/env python3
"""The machine's memory copy bandwidth: copies a 256 KiB buffer (socket-buffer sized, so
mostly within the caches, as a TCP stream's copies are) for the seconds given, prints GB/s.
A reference measured in every repetition: nothing but the machine moves it, so its spread
over a run tells how steady the machine was. (bytearray slice assignment is one memcpy;
Python's per-copy overhead is below 1 % at this size.) Usage: membw.py SECONDS"""

import sys
import time

SIZE = 256 << 10
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
