#!/usr/bin/env python3
"""Stand-in for the kernel compile: checks that the source defines the
kernel entry named after its file and records the call."""
import os
import re
import sys

args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
src = open(args["src"]).read()
stem = os.path.splitext(os.path.basename(args["src"]))[0]
if not re.search(r'extern "C" __global__ __aicore__ void ' + re.escape(stem) + r"\(", src):
    sys.exit(f"fake CANN: {args['src']} has no kernel entry {stem}")
with open(args["log"], "a") as f:
    f.write(f"compile_kernel unit={args['compute-unit']} op={args['op-type']} src={os.path.basename(args['src'])}\n")
os.makedirs(os.path.dirname(args["out"]), exist_ok=True)
open(args["out"], "w").write("fake kernel object\n")
