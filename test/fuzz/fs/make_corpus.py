#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""Writes the seed corpus of fuzz-codec: one file per request that a real
kernel wrote (test/unit/fs/requests.txt, NAME HEXBYTES a line)."""
import os
import sys

here = os.path.dirname(os.path.abspath(__file__))
src = os.path.join(here, "..", "..", "unit", "fs", "requests.txt")
out = os.path.join(here, "corpus")
os.makedirs(out, exist_ok=True)
n = 0
with open(src) as f:
    for line in f:
        if not line.strip() or line.startswith("#"):
            continue
        name, hexbytes = line.split()
        n += 1
        with open(os.path.join(out, f"{n:02d}-{name.lower()}"), "wb") as o:
            o.write(bytes.fromhex(hexbytes))
print(f"{n} seeds in {out}", file=sys.stderr)
