#!/usr/bin/env python3
"""One shared-nothing migration of a guest with bare QEMU, step for step as Shoal's QEMU driver
does it, and no Shoal involved: the anchor `make bench-migrate` compares Shoal against.
Prints one JSON line of measurements.

The guest's workload must print a line `tick N` (N counting up by one) about every 10 ms on its
console (workloads/idle.sh, workloads/busy.sh): the script times the pause the guest sees from
those lines and checks that the counter goes on from where it stopped."""

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vmlib  # noqa: E402

TICK = re.compile(r"tick (\d+)\s*$")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ticks(lines):
    return [int(m.group(1)) for m in map(TICK.search, lines) if m]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--qemu", default="qemu-system-x86_64")
    ap.add_argument("-L", dest="firmware", action="append", default=[], help="QEMU firmware dir (repeatable)")
    ap.add_argument("--kernel", required=True)
    ap.add_argument("--initrd", required=True)
    ap.add_argument("--append", default="console=ttyS0 quiet panic=-1 rw")
    ap.add_argument("--base", required=True, help="raw base disk image; each side gets a qcow2 overlay on it")
    ap.add_argument("--seed", required=True, help="NoCloud seed image (mkseed.py)")
    ap.add_argument("--memory-mib", type=int, default=128)
    ap.add_argument("--cpus", type=int, default=1, help="vCPUs (more than one runs TCG multi-threaded)")
    ap.add_argument("--tcg-thread", choices=["single", "multi"], help="TCG's threading (QEMU's default: multi)")
    ap.add_argument("--mode", choices=["pause", "live"], default="live")
    ap.add_argument("--max-downtime-ms", type=int, help="QEMU's downtime-limit (default: QEMU's own, 300 ms)")
    ap.add_argument("--bandwidth-mib", type=int, help="cap on memory and on disk copy, MiB/s (default: unlimited)")
    ap.add_argument("--settle-s", type=float, default=0, help="let the workload run this long before migrating")
    ap.add_argument("--verify-disk", action="store_true", help="qemu-img compare both overlays before the guest runs on")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--workload", help="a name for what the guest runs, echoed in the output")
    a = ap.parse_args()

    os.makedirs(a.workdir, exist_ok=True)
    w = lambda name: os.path.join(a.workdir, name)  # noqa: E731
    extra = [x for d in a.firmware for x in ("-L", d)]
    version = subprocess.run([a.qemu, "--version"], capture_output=True, text=True, check=True).stdout.split("\n")[0]
    # 7.2's default max-bandwidth is 32 MiB/s: "unlimited" must be said explicitly.
    bandwidth = (a.bandwidth_mib << 20) if a.bandwidth_mib else 1 << 40

    def overlay(path):
        if os.path.exists(path):
            os.remove(path)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", os.path.abspath(a.base), path],
                       check=True)

    def qemu(side, incoming):
        argv = vmlib.qemu_argv(a.qemu, a.kernel, a.initrd, a.append, w(f"{side}.qcow2"), a.seed, a.memory_mib,
                               w(f"{side}.sock"), w(f"{side}-console.log"), extra, a.cpus, a.tcg_thread)
        if incoming:  # paused until told, waiting for the memory stream's address
            argv += ["-S", "-incoming", "defer"]
        return vmlib.Qemu(argv, w(f"{side}-qemu.log"))

    overlay(w("src.qcow2"))
    # Empty consoles before anything follows them: a follower must not start on a previous run's.
    for side in ("src", "dst"):
        open(w(f"{side}-console.log"), "w").close()
    src_con, dst_con, src, dst = vmlib.Console(w("src-console.log")), None, None, None
    try:
        src = qemu("src", False)
        vmlib.wait_for('"shoal-guest: ready"', lambda: src_con.find("shoal-guest: ready") is not None, 120)
        vmlib.wait_for("the workload's first tick", lambda: ticks(l for _, l in src_con.snapshot()), 60)
        time.sleep(a.settle_s)

        # Destination: an empty overlay on the same base, exported over NBD for the disk copy.
        overlay(w("dst.qcow2"))
        nbd_port, mig_port = free_port(), free_port()
        dst_con = vmlib.Console(w("dst-console.log"))
        t_start = time.monotonic()
        dst = qemu("dst", True)
        dst.qmp.cmd("nbd-server-start", addr={"type": "inet", "data": {"host": "127.0.0.1", "port": str(nbd_port)}})
        dst.qmp.cmd("block-export-add", type="nbd", id="mig0", **{"node-name": "disk0"}, name="disk0", writable=True)
        dst.qmp.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{mig_port}")

        # Source: mirror only the overlay's own blocks (sync=top) onto the export; the base is
        # on both sides already.
        src.qmp.cmd("blockdev-add", driver="nbd", **{"node-name": "mig-nbd"},
                    server={"type": "inet", "host": "127.0.0.1", "port": str(nbd_port)}, export="disk0")
        mirror = {"speed": bandwidth} if a.bandwidth_mib else {}
        src.qmp.cmd("blockdev-mirror", **{"job-id": "mig-mirror"}, device="disk0", target="mig-nbd", sync="top", **mirror)

        def mirror_job():
            return next((j for j in src.qmp.cmd("query-block-jobs") if j["device"] == "mig-mirror"), None)

        job = vmlib.wait_for("the disk mirror to be ready", lambda: (j := mirror_job()) and j["ready"] and j, 600,
                             step=0.01)
        t_mirrored = time.monotonic()

        params = {"max-bandwidth": bandwidth}
        if a.max_downtime_ms is not None:
            params["downtime-limit"] = a.max_downtime_ms
        src.qmp.cmd("migrate-set-capabilities",
                    capabilities=[{"capability": "auto-converge", "state": a.mode == "live"}])
        src.qmp.cmd("migrate-set-parameters", **params)
        if a.mode == "pause":
            src.qmp.cmd("stop")
        t_migrate = time.monotonic()
        src.qmp.cmd("migrate", uri=f"tcp:127.0.0.1:{mig_port}")

        def migrated():
            m = src.qmp.cmd("query-migrate")
            return m if m.get("status") in ("completed", "failed", "cancelled") else None

        m = vmlib.wait_for("the memory copy", migrated, 600, step=0.01)
        if m["status"] != "completed":
            raise RuntimeError(f"migration {m['status']}: {m.get('error-desc', '')}")
        t_memory = time.monotonic()

        # The source is paused for good: finish the mirror without pivoting (cancel on a ready
        # job copies what is left first), then drop its NBD client so the export can go.
        job = mirror_job() or job
        src.qmp.cmd("block-job-cancel", device="mig-mirror")
        vmlib.wait_job_gone(src.qmp, "mig-mirror")
        done = [e for e in src.qmp.events if e["event"] in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")]
        disk_bytes = done[-1]["data"]["len"] if done else job["len"]
        src.qmp.cmd("blockdev-del", **{"node-name": "mig-nbd"})
        vmlib.wait_for("the destination to have the memory", lambda: dst.status() == "paused", 60, step=0.005)

        identical, verify_s = None, 0.0
        if a.verify_disk:
            # Both guests are paused; -U because both QEMUs still hold their images.
            t = time.monotonic()
            r = subprocess.run(["qemu-img", "compare", "-U", "-f", "qcow2", "-F", "qcow2", w("src.qcow2"), w("dst.qcow2")],
                               capture_output=True, text=True)
            identical, verify_s = r.returncode == 0, time.monotonic() - t
            if not identical:
                print(f"bare-migrate: disks differ: {r.stdout.strip()} {r.stderr.strip()}", file=sys.stderr)

        dst.qmp.cmd("block-export-del", id="mig0")
        dst.qmp.cmd("nbd-server-stop")
        dst.qmp.cmd("cont")
        t_running = time.monotonic()
        dst.qmp.cmd("announce-self", initial=50, max=550, rounds=5, step=100)
        src.quit()

        vmlib.wait_for("the guest's first line on the destination", lambda: len(dst_con.snapshot()) >= 2, 30, step=0.005)
        src_con.stop()
        dst_con.stop()
        src_ticks = ticks(l for _, l in src_con.snapshot())
        # A line cut in two by the pause ends on the destination's console.
        dst_lines = [l for _, l in dst_con.snapshot()]
        dst_ticks = ticks([src_con.partial + dst_lines[0]] + dst_lines[1:])
        ram = m.get("ram", {})
        out = {
            "qemu": version,
            "workload": a.workload,
            "mode": a.mode,
            "memory_mib": a.memory_mib,
            "cpus": a.cpus, "tcg_thread": a.tcg_thread,
            "max_downtime_ms": a.max_downtime_ms,
            "bandwidth_mib": a.bandwidth_mib,
            # From starting the destination QEMU to its guest running (less the optional compare).
            "total_s": round(t_running - t_start - verify_s, 3),
            "disk_copy_s": round(t_mirrored - t_start, 3),
            "memory_copy_s": round(t_memory - t_migrate, 3),
            "qemu_downtime_ms": m.get("downtime"),
            # From the memory copy's end to the guest running: finishing the disk copy, the
            # export's removal, `cont`. The guest is paused throughout.
            "after_copy_ms": round((t_running - t_memory - verify_s) * 1000, 1),
            # Last byte on the source's console to first byte on the destination's; the sum of
            # how long the source had been silent when the copy ended, after_copy_ms, and how
            # long after `cont` the destination's first line came.
            "guest_downtime_ms": round((dst_con.first_data - src_con.last_data - verify_s) * 1000, 1),
            "src_silent_ms": round((t_memory - src_con.last_data) * 1000, 1),
            "dst_first_line_ms": round((dst_con.first_data - t_running) * 1000, 1),
            "ram_transferred_bytes": ram.get("transferred"),
            "ram_total_bytes": ram.get("total"),
            "disk_mirrored_bytes": disk_bytes,
            "src_last_tick": src_ticks[-1] if src_ticks else None,
            "dst_first_tick": dst_ticks[0] if dst_ticks else None,
            "counter_continues": bool(src_ticks and dst_ticks and dst_ticks[0] == src_ticks[-1] + 1),
            "disk_identical": identical,
            "verify_s": round(verify_s, 3) if a.verify_disk else None,
        }
        print(json.dumps(out), flush=True)
    finally:
        for vm in (src, dst):
            if vm:
                vm.kill()
        for c in (src_con, dst_con):
            if c and not c.stopped:
                c.stop()


if __name__ == "__main__":
    try:
        main()
    except (vmlib.QMPError, TimeoutError, RuntimeError, OSError, subprocess.CalledProcessError) as e:
        sys.exit(f"bare-migrate: {e}")
