"""What the migration scripts share: a QMP client, the demo guest's QEMU command line, its NoCloud
seed, and a console follower that stamps each new line with the host's clock.
Python 3 standard library only, so the scripts run on any host that runs QEMU."""

import json
import os
import socket
import subprocess
import threading
import time


class QMPError(Exception):
    pass


class QMP:
    """QMP is JSON lines over a unix socket: a greeting, then `qmp_capabilities`, then commands
    whose replies carry our `id`. Events arrive interleaved with replies at any time, so they are
    kept in `events` instead of being mistaken for a reply."""

    def __init__(self, path, timeout=30.0):
        deadline = time.monotonic() + timeout
        while True:  # QEMU creates the socket a little after it starts
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self.file = self.sock.makefile("rwb", buffering=0)
        self.events = []
        self.next_id = 0
        self._read()  # greeting
        self.cmd("qmp_capabilities")

    def _read(self):
        line = self.file.readline()
        if not line:
            raise QMPError("QMP connection closed")
        return json.loads(line)

    def cmd(self, name, /, **args):
        self.next_id += 1
        msg = {"execute": name, "id": self.next_id}
        if args:
            msg["arguments"] = args
        self.file.write(json.dumps(msg).encode() + b"\n")
        while True:
            r = self._read()
            if "event" in r:
                self.events.append(r)
            elif r.get("id") == self.next_id:
                if "error" in r:
                    raise QMPError(f"{name}: {r['error'].get('desc')}")
                return r["return"]

    def close(self):
        self.sock.close()


def wait_for(what, check, timeout, step=0.05):
    """Polls check() until it returns something true; raises naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        v = check()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(step)


def wait_job_gone(q, job, timeout=60):
    gone = lambda: not any(j["device"] == job for j in q.cmd("query-block-jobs"))  # noqa: E731
    wait_for(f"block job {job} to go", gone, timeout, step=0.005)


# The demo guest's NIC: user-mode networking (restricted: nothing leaves the host) on QEMU's
# default 10.0.2.0/24, so the guest's init finds its NIC, reports ready and runs the user data.
MAC = "52:54:00:12:34:56"


def qemu_argv(qemu, kernel, initrd, append, disk, seed, mem_mib, qmp_sock, console, extra=(), cpus=1,
              tcg_thread=None):
    """The demo guest as Shoal's QEMU driver starts it (crates/shoal-hv/src/qemu/process.rs),
    always under TCG (`tcg_thread`: "single" or "multi", one thread for all vCPUs or one each; QEMU
    picks multi by default). The disk is a qcow2 overlay, the seed a raw vfat image."""
    accel = ["-machine", "pc", "-accel", f"tcg,thread={tcg_thread}"] if tcg_thread else ["-machine", "pc,accel=tcg"]
    return [
        qemu, *accel, "-m", str(mem_mib), "-smp", str(cpus),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-chardev", f"file,id=con0,path={console}", "-serial", "chardev:con0",
        "-qmp", f"unix:{qmp_sock},server=on,wait=off",
        # Named block nodes, so that the destination can export its disk by name over NBD.
        "-blockdev", f"driver=file,filename={disk},node-name=disk0-file",
        "-blockdev", "driver=qcow2,file=disk0-file,node-name=disk0",
        "-device", "virtio-blk-pci,drive=disk0",
        "-drive", f"file={seed},if=virtio,format=raw,readonly=on",
        "-netdev", "user,id=net0,restrict=on",
        "-device", f"virtio-net-pci,netdev=net0,mac={MAC}",
        "-kernel", kernel, "-initrd", initrd, "-append", append,
        *extra,
    ]


def make_seed(path, user_data, hostname="mig"):
    """A NoCloud seed like Shoal's (crates/shoal-hv/src/qemu/seed.rs): a vfat volume labelled
    CIDATA with meta-data, a cloud-init v1 network-config and the user data, built with
    mkfs.vfat and mcopy so that no mount is needed."""
    files = {
        "meta-data": f"instance-id: {hostname}-{os.getpid()}-{time.time_ns()}\nlocal-hostname: {hostname}\n",
        "network-config": (
            "version: 1\nconfig:\n  - type: physical\n    name: eth0\n"
            f'    mac_address: "{MAC}"\n    mtu: 1500\n    subnets:\n      - type: static\n'
            "        address: 10.0.2.15/24\n        gateway: 10.0.2.2\n"
        ),
        "user-data": user_data,
    }
    env = dict(os.environ, MTOOLS_SKIP_CHECK="1")
    if os.path.exists(path):
        os.remove(path)
    subprocess.run(["mkfs.vfat", "-C", "-n", "CIDATA", path, "1024"], check=True, env=env, capture_output=True)
    tmp = path + ".d"
    os.makedirs(tmp, exist_ok=True)
    for name, text in files.items():
        with open(os.path.join(tmp, name), "w") as f:
            f.write(text)
        subprocess.run(["mcopy", "-i", path, os.path.join(tmp, name), f"::{name}"], check=True, env=env)
        os.remove(os.path.join(tmp, name))
    os.rmdir(tmp)


class Console:
    """Follows a console file from a thread, stamping each complete new line with
    time.monotonic() when it was first seen, so that downtime can be read off two consoles."""

    def __init__(self, path, poll_s=0.001):
        self.path, self.poll_s = path, poll_s
        self.lines = []  # (host time, text)
        self.first_data = self.last_data = None  # host times of the first and last bytes seen
        self.partial = ""  # an unfinished last line
        self.lock = threading.Lock()
        self.stopped = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        pos, partial = 0, b""
        while not self.stopped:
            try:
                with open(self.path, "rb") as f:
                    f.seek(pos)
                    data = f.read()
            except FileNotFoundError:
                data = b""
            now = time.monotonic()
            if data:
                pos += len(data)
                *done, partial = (partial + data).split(b"\n")
                with self.lock:
                    self.first_data = self.first_data or now
                    self.last_data = now
                    self.partial = partial.decode(errors="replace")
                    self.lines.extend((now, l.decode(errors="replace").rstrip("\r")) for l in done)
            time.sleep(self.poll_s)

    def snapshot(self):
        with self.lock:
            return list(self.lines)

    def find(self, text, since=0):
        """Index of the first line at index >= since that contains text, or None."""
        for i, (_, l) in enumerate(self.snapshot()[since:], since):
            if text in l:
                return i
        return None

    def stop(self):
        self.stopped = True
        self.thread.join()


class Qemu:
    """One QEMU process we started, with its QMP connection; kill() only ever ends this pid."""

    def __init__(self, argv, log):
        self.log = open(log, "ab")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log)
        qmp_sock = argv[argv.index("-qmp") + 1].split(",")[0].removeprefix("unix:")
        try:
            self.qmp = QMP(qmp_sock)
        except Exception:
            self.kill()
            raise

    def status(self):
        return self.qmp.cmd("query-status")["status"]

    def quit(self):
        try:
            self.qmp.cmd("quit")
        except (QMPError, OSError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
