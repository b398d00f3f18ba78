#!/usr/bin/env python3
"""Markdown tables from the JSON lines of dirty-check.py (one table per file, a row per run) or of
bare-migrate.py (a row per run, then medians per workload and mode): summarize.py FILE.jsonl..."""

import json
import statistics
import sys

CHECK = ["run", "verdict", "phase_at_start", "migrate_s", "downtime_ms", "ram_transferred_mib", "downtime_bytes",
         "dirty_sync_count", "peak_dirty_pages_rate", "passes_after"]
ANCHOR = ["workload", "mode", "total_s", "disk_copy_s", "memory_copy_s", "qemu_downtime_ms", "after_copy_ms",
          "guest_downtime_ms", "src_silent_ms", "dst_first_line_ms", "ram_transferred_bytes", "disk_mirrored_bytes",
          "counter_continues", "disk_identical"]


def table(cols, rows):
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")


for path in sys.argv[1:]:
    rows = [json.loads(l) for l in open(path)]
    if rows and "total_s" in rows[0]:
        table(ANCHOR, rows)
        groups = {}
        for r in rows:
            groups.setdefault((r["qemu"].split("(")[0].strip(), r.get("workload"), r["mode"]), []).append(r)
        print("\nMedians:\n")
        med = [dict(qemu=q, workload=w, mode=m, runs=len(g),
                    **{c: round(statistics.median(r[c] for r in g), 3) for c in ANCHOR[2:12]})
               for (q, w, m), g in groups.items()]
        table(["qemu", "workload", "mode", "runs"] + ANCHOR[2:12], med)
        continue
    runs = [r for r in rows if not r.get("summary")]
    if not runs:
        continue
    r0 = runs[0]
    counts = ", ".join(f"{v} {sum(r['verdict'] == v for r in runs)}" for v in ("ok", "BAD", "crashed", "stalled"))
    thread = f" (TCG thread={r0['tcg_thread']})" if r0.get("tcg_thread") else ""
    print(f"\n{r0['qemu'].split('(')[0].strip()}, {r0['mode']}, {r0.get('cpus', 1)} vCPU{thread}, bandwidth "
          f"{r0.get('bandwidth_mib') or 'unlimited'} ({path.split('/')[-1]}): {counts}\n")
    table(CHECK, runs)
