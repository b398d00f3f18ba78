#!/usr/bin/env python3
"""Writes a NoCloud seed for the demo guest (vfat, CIDATA) running USER_DATA, a `#!` script:
mkseed.py SEED.img workloads/busy.sh"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vmlib  # noqa: E402

if len(sys.argv) != 3:
    sys.exit(__doc__)
with open(sys.argv[2]) as f:
    vmlib.make_seed(sys.argv[1], f.read())
