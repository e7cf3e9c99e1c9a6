#!/usr/bin/env python3
"""Stand-in: print `OpType-op_file` for every op of an ops-info ini, with
the file name derived from the op type the way CANN does (Conv2DCustom ->
conv2_d_custom)."""
import re
import sys

ini = [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--ini-file=")][0]
for line in open(ini):
    m = re.match(r"^\[(\w+)\]$", line.strip())
    if m:
        op = m.group(1)
        snake = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", op).lower()
        print(f"{op}-{snake}")
