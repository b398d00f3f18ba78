#!/usr/bin/env python3
"""Markdown tables from dirty-check.py's JSON lines: summarize.py RESULTS.jsonl..."""

import json
import sys

COLS = ["run", "verdict", "phase_at_start", "migrate_s", "downtime_ms", "ram_transferred_mib", "downtime_bytes",
        "dirty_sync_count", "peak_dirty_pages_rate", "passes_after"]
for path in sys.argv[1:]:
    rows = [json.loads(l) for l in open(path)]
    runs = [r for r in rows if not r.get("summary")]
    if not runs:
        continue
    r0 = runs[0]
    print(f"\n{r0['qemu'].split('(')[0].strip()}, {r0['mode']}, bandwidth {r0.get('bandwidth_mib') or 'unlimited'}"
          f" ({path.split('/')[-1]}): " + ", ".join(f"{v} {sum(r['verdict'] == v for r in runs)}"
                                                   for v in ("ok", "BAD", "crashed", "stalled")) + "\n")
    print("| " + " | ".join(COLS) + " |")
    print("|" + "---|" * len(COLS))
    for r in runs:
        print("| " + " | ".join(str(r.get(c, "")) for c in COLS) + " |")
