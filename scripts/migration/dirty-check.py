#!/usr/bin/env python3
"""Does live pre-copy migration under TCG lose pages a busy guest writes? Boots the demo guest with
the busy workload (workloads/busy.sh), then migrates it back and forth between two QEMUs on
127.0.0.1, each hop one run: the destination starts with `-S -incoming defer` on the same disk
(shared storage, so only memory is under test), the source migrates (`live`: running; `pause`:
`stop` first), the destination gets `cont`, the source quits, and the guest runs WATCH seconds on
the destination. A run is corrupt when the destination's console shows `BAD` (a page of the
rewritten file holds an older pass), a kernel oops/panic, QEMU exits, or the guest stops printing
(no busy pass ends within WATCH + 30 s, or no tick in the last 2 s).
After a corrupt run the guest is booted afresh. Prints one JSON line per run, then a summary."""

import argparse
import json
import os
import random
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vmlib  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--qemu", default="qemu-system-x86_64")
    ap.add_argument("-L", dest="firmware", action="append", default=[], help="QEMU firmware dir (repeatable)")
    ap.add_argument("--template", required=True, help="dir with vmlinux, initrd.cpio, disk.raw")
    ap.add_argument("--append", default="console=ttyS0 quiet panic=-1 rw")
    ap.add_argument("--mode", choices=["live", "pause"], required=True)
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--memory-mib", type=int, default=128)
    ap.add_argument("--cpus", type=int, default=1, help="vCPUs (more than one runs TCG multi-threaded)")
    ap.add_argument("--tcg-thread", choices=["single", "multi"], help="TCG's threading (QEMU's default: multi)")
    ap.add_argument("--watch-s", type=float, default=10,
                    help="time the guest runs on the destination (longer if its busy pass has not ended)")
    ap.add_argument("--downtime-ms", type=int, default=300)
    ap.add_argument("--bandwidth-mib", type=int, help="cap the copy so that it spans more of the guest's writes")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--port", type=int, default=47700)
    a = ap.parse_args()
    os.makedirs(a.workdir, exist_ok=True)
    extra = [x for d in a.firmware for x in ("-L", d)]
    version = subprocess.run([a.qemu, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    disk, seed = f"{a.workdir}/disk.qcow2", f"{a.workdir}/seed.img"

    def start(n, incoming):
        con = f"{a.workdir}/console-{n}.log"
        open(con, "w").close()
        argv = vmlib.qemu_argv(a.qemu, f"{a.template}/vmlinux", f"{a.template}/initrd.cpio", a.append, disk, seed,
                               a.memory_mib, f"{a.workdir}/qmp-{n % 2}.sock", con, extra, a.cpus, a.tcg_thread)
        if incoming:
            argv += ["-S", "-incoming", "defer"]
        return vmlib.Qemu(argv, f"{a.workdir}/qemu-{n}.log"), vmlib.Console(con)

    def boot(n):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", f"{a.template}/disk.raw", disk],
                       check=True)
        vmlib.make_seed(seed, open(f"{HERE}/workloads/busy.sh").read())
        vm, con = start(n, False)
        # Migrate only once the rewriting loop has done a pass, so every run migrates a busy guest.
        vmlib.wait_for("the first busy pass", lambda: con.find("busy 1 ok") is not None, 120)
        if con.find("selftest ok") is None:
            raise RuntimeError("the guest's stale-page self-test failed: its check would miss corruption")
        return vm, con

    results, n = [], 0
    src, src_con = boot(n)
    try:
        for run in range(1, a.runs + 1):
            # Land at a random point of the busy loop (a pass takes several seconds under TCG).
            time.sleep(random.uniform(0, 3))
            n += 1
            dst, dst_con = start(n, True)
            port = a.port + n % 2
            dst.qmp.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
            # 7.2 caps migration at 32 MiB/s unless told otherwise.
            bandwidth = (a.bandwidth_mib << 20) if a.bandwidth_mib else 10 << 30
            params = {"max-bandwidth": bandwidth, "downtime-limit": a.downtime_ms}
            src.qmp.cmd("migrate-set-capabilities",
                        capabilities=[{"capability": "auto-converge", "state": a.mode == "live"}])
            src.qmp.cmd("migrate-set-parameters", **params)
            # Where the busy loop is when the copy starts: writing its file, or checking it.
            marks = [l.split()[1] for _, l in src_con.snapshot()
                     if l.startswith(("user-data: fill ", "user-data: check "))]
            phase = {"fill": "writing", "check": "checking"}.get(marks[-1] if marks else "", "?")
            t0 = time.monotonic()
            if a.mode == "pause":
                src.qmp.cmd("stop")
            src.qmp.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")

            peak_rate = [0]

            def done():
                m = src.qmp.cmd("query-migrate")
                # QEMU reports the dirty rate only while the migration is active: once it has
                # completed, query-migrate shows 0 whatever the guest did.
                peak_rate[0] = max(peak_rate[0], m.get("ram", {}).get("dirty-pages-rate", 0))
                return m if m.get("status") in ("completed", "failed", "cancelled") else None

            m = vmlib.wait_for("the migration", done, 300, step=0.01)
            if m["status"] != "completed":
                raise RuntimeError(f"migration {m['status']}: {m.get('error-desc')}")
            vmlib.wait_for("the destination to be paused", lambda: dst.status() == "paused", 30, step=0.005)
            dst.qmp.cmd("cont")
            elapsed = time.monotonic() - t0
            resumed = len(dst_con.snapshot())
            src.quit()
            src_con.stop()
            time.sleep(a.watch_s)
            # A slow host can stretch a pass past WATCH: give the guest up to 30 s to finish the
            # pass it was in, so that only a guest that stopped making progress counts as stalled.
            finished = lambda: any(l.startswith(("user-data: busy ", "user-data: BAD"))  # noqa: E731
                                   for _, l in dst_con.snapshot()[resumed:])
            while not finished() and time.monotonic() - t0 < a.watch_s + 30 and dst.proc.poll() is None:
                time.sleep(0.5)
            lines = [l for _, l in dst_con.snapshot()]
            after = lines[resumed:] if resumed < len(lines) else []
            bad = [l for l in lines if "BAD" in l]
            oops = [l for l in lines
                    if any(k in l for k in ("Kernel panic", "Oops", "BUG:", "kernel BUG", "segfault",
                                            "general protection", "detected stalls"))]
            passes = [l for l in after if l.startswith("user-data: busy ")]
            tail_ticks = [t for t, l in dst_con.snapshot() if "tick" in l and t > time.monotonic() - 2]
            exited = dst.proc.poll() is not None
            if bad:
                verdict = "BAD"
            elif oops or exited:
                verdict = "crashed"
            elif not passes or not tail_ticks:
                verdict = "stalled"
            else:
                verdict = "ok"
            ram = m.get("ram", {})
            r = {
                "qemu": version, "mode": a.mode, "cpus": a.cpus, "tcg_thread": a.tcg_thread,
                "bandwidth_mib": a.bandwidth_mib, "downtime_limit_ms": a.downtime_ms, "run": run, "verdict": verdict,
                "migrate_s": round(elapsed, 3), "downtime_ms": m.get("downtime"),
                "ram_transferred_mib": round(ram.get("transferred", 0) / 2**20, 1),
                "dirty_sync_count": ram.get("dirty-sync-count"), "dirty_pages_rate": ram.get("dirty-pages-rate"),
                "peak_dirty_pages_rate": peak_rate[0],
                # Pages sent with data (not zero pages), and what the final paused stage sent:
                # in live mode, the pages tracking found dirty after the last pass.
                "normal_pages": ram.get("normal"), "downtime_bytes": ram.get("downtime-bytes"),
                "phase_at_start": phase,
                "passes_after": len(passes), "evidence": (bad + oops)[:2],
            }
            results.append(r)
            print(json.dumps(r), flush=True)
            src, src_con = dst, dst_con
            if verdict != "ok":  # a corrupt guest is no base for the next run
                src.kill()
                src_con.stop()
                n += 1
                src, src_con = boot(n)
    finally:
        src.kill()
        src_con.stop()
    counts = {v: sum(r["verdict"] == v for r in results) for v in ("ok", "BAD", "crashed", "stalled")}
    print(json.dumps({"summary": True, "qemu": version, "mode": a.mode, "runs": len(results), **counts}))


if __name__ == "__main__":
    main()
