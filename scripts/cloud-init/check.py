#!/usr/bin/python3
"""Checks a NoCloud seed (meta-data, user-data, network-config) with the real cloud-init of each
distribution release Shoal's guests run, as fetched and extracted by scripts/cloud-init/fetch.

    scripts/cloud-init/check.py SEED_DIR [--cache DIR] [--versions LABEL_OR_VERSION,...] [--keep]

For each pinned version (read from the PINS of the fetch script beside this file), in subprocesses
whose PYTHONPATH points into that version's extracted tree:
  user-data       the version's own UserDataProcessor splits it into parts (MIME multipart or a
                  single #cloud-config / #! script) and its own part handlers merge the cloud-config
                  parts, honouring merge_how, into the cloud-config cloud-init writes at boot; every
                  cloud-config part and the merged result go through the version's schema validator
                  (strict, deprecations included); no list item of any part may be lost in the merge
  user-data-cli   `cloud-init schema --config-file` (22.1: `devel schema`) on each part and the merge
  meta-data       loads as a YAML mapping with an instance-id
  network-parse   the version's network_state parser, without warnings
  network-schema  `cloud-init schema --schema-type network-config`, where the version has it
  render-eni, render-netplan, render-networkd
                  `cloud-init devel net-convert`; the output must carry the seed's static address
                  with prefix, default gateway, MTU and DNS servers
Any error, logged WARNING or deprecation (at whatever level the version logs it) fails the check.
One line per version and check, then a JSON summary line; exit 0 only when every check of every
selected version passed (1: a check failed, 2: a version could not be run at all).

The subprocesses run as nobody when this runs as root: cloud-init's CLI, run as root, detects a
datasource on the host and writes /run/cloud-init/ (seen with 24.1 and later).
"""

import argparse
import concurrent.futures
import hashlib
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

HOST_PYTHON = "/usr/bin/python3"
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CACHE = "/var/cache/shoal/cloud-init"
SITE = "root/usr/lib/python3/dist-packages"
NOBODY = 65534
RENDERERS = ("eni", "netplan", "networkd")
PER_CALL_TIMEOUT = 120


# --------------------------------------------------------------------------------------------
# Worker: runs inside one version's tree (PYTHONPATH), imports only that cloud-init.
# --------------------------------------------------------------------------------------------


class Capture:
    """Collects what cloud-init logs at WARNING and above, and anything mentioning a
    deprecation at any level (newer versions log deprecations of features older than the
    release's DEPRECATION_INFO_BOUNDARY at INFO or DEBUG)."""

    def __init__(self):
        import logging

        self.records = []
        capture = self

        class Handler(logging.Handler):
            def emit(self, record):
                try:
                    msg = record.getMessage()
                except Exception as e:  # a broken log call is itself worth reporting
                    msg = f"{record.msg!r} (unformattable: {e})"
                if record.levelno >= logging.WARNING or "deprecat" in msg.lower():
                    capture.records.append(f"{record.levelname}: {msg.strip()}")

        root = logging.getLogger()
        root.setLevel(logging.DEBUG)
        root.addHandler(Handler(logging.DEBUG))

    def take(self):
        got, self.records = self.records, []
        return got


def worker(seed, out, expect_root, distro_name):
    import inspect
    import warnings

    warnings.simplefilter("always")
    py_warnings = []

    def showwarning(message, category, filename, lineno, file=None, line=None):
        py_warnings.append((category.__name__, str(message), filename, lineno))

    warnings.showwarning = showwarning

    import cloudinit
    from cloudinit import version as ci_version

    here = os.path.realpath(os.path.dirname(cloudinit.__file__))
    if not here.startswith(os.path.realpath(expect_root) + os.sep):
        raise SystemExit(f"imported cloudinit from {here}, not from {expect_root}")

    # As cloud-init's main() does first: 24.1 and later add the DEPRECATED level and
    # Logger.deprecated here, which the schema validator calls.
    try:
        from cloudinit.log import loggers as ci_log  # 25.1 and later
    except ImportError:
        from cloudinit import log as ci_log
    if hasattr(ci_log, "configure_root_logger"):
        ci_log.configure_root_logger()
    cap = Capture()
    from cloudinit import handlers, helpers, user_data, util
    from cloudinit.config import schema as ci_schema
    from cloudinit.handlers.cloud_config import CloudConfigPartHandler
    from cloudinit.handlers.shell_script import ShellScriptPartHandler
    from cloudinit.net import network_state
    from cloudinit.settings import PER_ALWAYS, PER_INSTANCE

    class BootHookCheck(handlers.Handler):
        """Takes boothook parts as cloud-init's own handler would, without running them here."""

        def __init__(self):
            handlers.Handler.__init__(self, PER_ALWAYS)

        def list_types(self):
            return ["text/cloud-boothook"]

        def handle_part(self, data, ctype, filename, payload, frequency):
            pass

    results = {"version": ci_version.version_string(), "checks": {}, "parts": [], "merged": None}
    checks = results["checks"]
    import_noise = cap.take()

    def problems(extra=()):
        found = list(extra) + cap.take()
        # Python's own DeprecationWarnings (crypt, jsonschema's API) are about this host's Python
        # and libraries, not about the seed: cloud-init reports its deprecations by logging.
        for category, message, filename, lineno in py_warnings:
            if category in ("DeprecationWarning", "PendingDeprecationWarning", "ResourceWarning"):
                continue
            if os.path.realpath(filename).startswith(here):
                found.append(f"python {category}: {message} ({os.path.basename(filename)}:{lineno})")
        py_warnings.clear()
        return list(dict.fromkeys(found))

    if import_noise:
        checks["import"] = "FAIL: importing cloud-init logged: " + "; ".join(import_noise)

    # ---- meta-data
    meta = None
    try:
        meta = util.load_yaml(read(seed, "meta-data", binary=False))
    except Exception as e:
        checks["meta-data"] = f"FAIL: {type(e).__name__}: {e}"
    if "meta-data" not in checks:
        found = problems()
        if not isinstance(meta, dict):
            checks["meta-data"] = "FAIL: meta-data is not a YAML mapping"
        elif not meta.get("instance-id"):
            checks["meta-data"] = "FAIL: meta-data has no instance-id"
        elif found:
            checks["meta-data"] = "FAIL: " + "; ".join(found)
        else:
            checks["meta-data"] = "ok"
    iid = str((meta or {}).get("instance-id") or "iid-shoal-check")

    # ---- user-data: parts and merge, with the version's own processor and part handlers
    class SeedDatasource:
        """The little of a datasource the part handlers ask for."""

        def get_instance_id(self):
            return iid

    state = os.path.join(out, "state")
    paths = helpers.Paths(
        {
            "cloud_dir": os.path.join(state, "var-lib-cloud"),
            "run_dir": os.path.join(state, "run-cloud-init"),
            "templates_dir": os.path.join(state, "templates"),
            "docs_dir": os.path.join(state, "docs"),
        },
        ds=SeedDatasource(),
    )

    def validate(config):
        """Strict schema validation of one cloud-config; returns a list of problems."""
        sig = inspect.signature(ci_schema.validate_cloudconfig_schema)
        kwargs = {"strict": True}
        if "log_deprecations" in sig.parameters:
            kwargs["log_deprecations"] = True
        if "log_details" in sig.parameters:
            kwargs["log_details"] = True
        found = []
        try:
            ci_schema.validate_cloudconfig_schema(config, schema=ci_schema.get_schema(), **kwargs)
        except ci_schema.SchemaValidationError as e:
            found.append(" ".join(str(e).split()))
        except Exception as e:
            found.append(f"validator raised {type(e).__name__}: {e}")
        return problems(found)

    raw = read(seed, "user-data")
    ud_fail = []
    merged = None
    parts = results["parts"]
    try:
        if not raw.strip():
            ud_fail.append("user-data is empty: cloud-init would configure nothing")
        msg = user_data.UserDataProcessor(paths).process(raw)
        seen = []
        handlers.walk(msg, lambda _d, fn, payload, headers: seen.append((headers, fn, payload)), None)
        cc_handler = CloudConfigPartHandler(paths=paths)
        cc_handler.cloud_fn = os.path.join(out, "merged-cloud-config.txt")
        registry = helpers.ContentHandlers()
        for h in (cc_handler, ShellScriptPartHandler(paths=paths), BootHookCheck()):
            registry.register(h, overwrite=False)
        part_data = {
            "handlers": registry,
            "handlerdir": os.path.join(state, "handlers"),
            "data": None,
            "frequency": PER_INSTANCE,
            "handlercount": 0,
            "excluded": [],
        }
        for _ctype, mod in registry.items():
            if mod not in registry.initialized:
                handlers.call_begin(mod, None, PER_INSTANCE)
                registry.initialized.append(mod)
        try:
            handlers.walk(msg, handlers.walker_callback, data=part_data)
        finally:
            for _ctype, mod in registry.items():
                if mod in registry.initialized:
                    registry.initialized.remove(mod)
                    handlers.call_end(mod, None, PER_INSTANCE)
        merge_log = problems()
        if merge_log:
            ud_fail.append("processing logged: " + "; ".join(merge_log))

        for n, (headers, fn, payload) in enumerate(seen):
            ctype = headers.get("Content-Type")
            text = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else payload
            part = {"n": n, "filename": fn, "type": ctype, "merge_type": headers.get("Merge-Type")}
            parts.append(part)
            if ctype == "text/cloud-config":
                try:
                    config = util.load_yaml(text)
                except Exception as e:
                    config = None
                    part["problems"] = [f"{type(e).__name__}: {e}"]
                found = problems()
                if not isinstance(config, dict):
                    part["problems"] = part.get("problems", []) + found + ["not a YAML mapping"]
                else:
                    part["problems"] = found + validate(config)
                    part["config"] = config
                file = os.path.join(out, f"part-{n}.cloud-config")
                with open(file, "w") as f:
                    f.write(text)
                part["file"] = file
            elif ctype in ("text/x-shellscript",):
                part["problems"] = [] if text.startswith("#!") else ["script without #!"]
            elif ctype == "text/cloud-boothook":
                # cloud-init strips the first line and runs the rest, which must be a script.
                rest = text.split("\n", 1)[1].lstrip() if "\n" in text else ""
                part["problems"] = [] if rest.startswith("#!") else ["boothook without #! after its first line"]
            elif ctype == "text/x-not-multipart" and not text.strip():
                part["problems"] = []  # the empty user-data, reported above
            else:
                part["problems"] = [f"content type {ctype} is not a cloud-config or a #! script"]
            for p in part["problems"]:
                ud_fail.append(f"part {n} ({ctype}): {p}")

        configs = [p for p in parts if "config" in p]
        if raw.strip() and not parts:
            ud_fail.append("no part cloud-init would act on")
        if os.path.exists(cc_handler.cloud_fn) and os.path.getsize(cc_handler.cloud_fn):
            merged = util.load_yaml(read("", cc_handler.cloud_fn, binary=False))
            found = problems()
            if not isinstance(merged, dict):
                ud_fail.append("the merged cloud-config is not a mapping: " + "; ".join(found))
                merged = None
            else:
                for p in validate(merged) + found:
                    ud_fail.append(f"merged cloud-config: {p}")
                results["merged_file"] = cc_handler.cloud_fn
        elif configs:
            ud_fail.append("the cloud-config parts merged into nothing")
        if merged is not None:
            results["merged"] = merged
            for p in configs:
                lost, overridden = merge_losses(p["config"], merged)
                for path in lost:
                    ud_fail.append(f"merge lost {path} of part {p['n']}")
                if overridden:
                    p["overridden"] = overridden
            # The users cc_users_groups would create from the merge (the image's default user
            # comes from its /etc/cloud/cloud.cfg: a stand-in here).
            from cloudinit import distros
            from cloudinit.distros import ug_util

            stand_in = {"name": "image-default-user", "lock_passwd": True, "shell": "/bin/bash"}
            distro = distros.fetch(distro_name)(distro_name, {"default_user": stand_in}, paths)
            import copy  # normalize_users_groups pops the names out of what it is given

            users, _groups = ug_util.normalize_users_groups(copy.deepcopy(merged), distro)
            results["users"] = sorted(users)
            for p in configs:
                for name in user_names(p["config"].get("users")):
                    if name not in users:
                        ud_fail.append(f"user {name} of part {p['n']} is not among the users "
                                       f"cloud-init would create: {sorted(users)}")
            found = problems()
            if found:
                ud_fail.append("reading the merged users logged: " + "; ".join(found))
    except Exception as e:
        import traceback

        ud_fail.append(f"{type(e).__name__}: {e} [{traceback.format_exc().splitlines()[-3].strip()}]")
    checks["user-data"] = "FAIL: " + " | ".join(ud_fail) if ud_fail else "ok"

    # ---- network-config: the version's parser (the renderers run through the CLI)
    try:
        net = util.load_yaml(read(seed, "network-config", binary=False))
        found = problems()
        if not isinstance(net, dict):
            raise ValueError("network-config is not a YAML mapping")
        if "network" in net and "version" not in net:
            net = net["network"]
        ns = network_state.parse_net_config_data(net)
        found += problems()
        ifaces = [i.get("name") for i in ns.iter_interfaces()]
        if not ifaces:
            found.append("no interface parsed")
        checks["network-parse"] = "FAIL: " + "; ".join(found) if found else "ok"
        results["network"] = {"interfaces": ifaces, "dns": list(ns.dns_nameservers)}
    except Exception as e:
        checks["network-parse"] = "FAIL: " + "; ".join(problems([f"{type(e).__name__}: {e}"]))

    with open(os.path.join(out, "worker.json"), "w") as f:
        json.dump(results, f, default=str)


def user_names(users):
    """The named users of a cloud-config `users` value (a list, or a comma-separated string)."""
    if isinstance(users, str):
        users = users.split(",")
    if isinstance(users, dict):
        users = [dict(v or {}, name=k) for k, v in users.items()]
    names = []
    for u in users or []:
        if isinstance(u, str):
            names += [n.strip() for n in u.split(",") if n.strip() and n.strip() != "default"]
        elif isinstance(u, list):
            names += [str(n) for n in u if n != "default"]
        elif isinstance(u, dict) and u.get("name"):
            names.append(str(u["name"]))
    return names


def merge_losses(part, merged, path=""):
    """What of `part` is missing from `merged`: list items and keys are lost when absent
    (a failure), scalars that differ were overridden by another part (reported)."""
    lost, overridden = [], []
    if isinstance(part, dict):
        if not isinstance(merged, dict):
            return [path or "(top)"], []
        for k, v in part.items():
            if not path and k in ("merge_how", "merge_type"):
                continue
            sub = f"{path}.{k}" if path else str(k)
            if k not in merged:
                lost.append(sub)
            else:
                l, o = merge_losses(v, merged[k], sub)
                lost += l
                overridden += o
    elif isinstance(part, list):
        if not isinstance(merged, list):
            return [path], []
        for i, item in enumerate(part):
            if item not in merged:
                if isinstance(item, dict) and "name" in item:
                    shown = f"(user {item['name']})"
                else:
                    shown = json.dumps(item, default=str)
                    shown = shown if len(shown) <= 60 else shown[:57] + "..."
                lost.append(f"{path}[{i}] {shown}")
    elif part != merged:
        overridden.append(path)
    return lost, overridden


def read(seed, name, binary=True):
    with open(os.path.join(seed, name), "rb") as f:
        data = f.read()
    return data if binary else data.decode("utf-8")


# --------------------------------------------------------------------------------------------
# The expected network values, from the seed's own network-config (host Python + PyYAML).
# --------------------------------------------------------------------------------------------


def expected_network(path):
    import yaml

    with open(path) as f:
        cfg = yaml.safe_load(f)
    if isinstance(cfg, dict) and "network" in cfg and "version" not in cfg:
        cfg = cfg["network"]
    exp = {"addresses": [], "gateways": [], "mtus": [], "dns": []}

    def add(key, value):
        if value is not None and value not in exp[key]:
            exp[key].append(value)

    def address(addr, prefix=None, netmask=None):
        if "/" not in str(addr):
            if prefix is None and netmask:
                prefix = ipaddress.IPv4Network(f"0.0.0.0/{netmask}").prefixlen
            addr = f"{addr}/{prefix if prefix is not None else 32}"
        add("addresses", str(ipaddress.ip_interface(addr)))

    def default_route(dest):
        return str(dest) in ("default", "0.0.0.0/0", "0.0.0.0", "::/0")

    if not isinstance(cfg, dict):
        raise ValueError("network-config is not a mapping")
    if cfg.get("version") == 1:
        for item in cfg.get("config") or []:
            if item.get("type") == "nameserver":
                for a in item.get("address") or []:
                    add("dns", str(a))
            if item.get("type") not in ("physical", "bond", "bridge", "vlan"):
                continue
            add("mtus", item.get("mtu"))
            for sn in item.get("subnets") or []:
                if sn.get("type") not in ("static", "static6"):
                    continue
                address(sn["address"], sn.get("prefix"), sn.get("netmask"))
                add("gateways", sn.get("gateway") and str(sn["gateway"]))
                add("mtus", sn.get("mtu"))
                for a in sn.get("dns_nameservers") or []:
                    add("dns", str(a))
                for r in sn.get("routes") or []:
                    if default_route(r.get("network", "")) and str(r.get("prefix", 0)) == "0":
                        add("gateways", str(r.get("gateway")))
    elif cfg.get("version") == 2:
        for kind in ("ethernets", "bonds", "bridges", "vlans"):
            for _name, dev in (cfg.get(kind) or {}).items():
                for a in dev.get("addresses") or []:
                    address(a)
                add("gateways", dev.get("gateway4") and str(dev["gateway4"]))
                for r in dev.get("routes") or []:
                    if default_route(r.get("to")):
                        add("gateways", str(r.get("via")))
                add("mtus", dev.get("mtu"))
                for a in (dev.get("nameservers") or {}).get("addresses") or []:
                    add("dns", str(a))
    else:
        raise ValueError(f"network-config version {cfg.get('version')!r} is neither 1 nor 2")
    return exp


def files_under(root):
    for d, _dirs, files in os.walk(root):
        for name in sorted(files):
            p = os.path.join(d, name)
            with open(p, errors="replace") as f:
                yield os.path.relpath(p, root), f.read()


def python_reprs(text):
    """Lines where a renderer wrote a Python dict or list instead of a value (22.1 does, for
    v2 nameservers, in ENI: `dns {'nameservers': [...], 'search': []}`)."""
    return [
        f"a Python repr in `{line.strip()[:60]}`"
        for line in text.splitlines()
        if not line.lstrip().startswith("#") and re.search(r"[{\[]'", line)
    ]


def check_eni(root, exp):
    text = "\n".join(t for p, t in files_under(root) if "network/interfaces" in p)
    if not text:
        return ["no ENI file written"]
    missing = python_reprs(text)
    for a in exp["addresses"]:
        ip = ipaddress.ip_interface(a)
        plain = re.search(rf"^\s*address\s+{re.escape(str(ip))}\s*$", text, re.M)
        split = re.search(rf"^\s*address\s+{re.escape(str(ip.ip))}\s*$", text, re.M) and re.search(
            rf"^\s*netmask\s+({re.escape(str(ip.netmask))}|{ip.network.prefixlen})\s*$", text, re.M
        )
        if not (plain or split):
            missing.append(f"no address {a}")
    for g in exp["gateways"]:
        if not re.search(
            rf"^\s*(gateway\s+{re.escape(g)}|(post-)?up\s+route\s+add\s+default\s+gw\s+{re.escape(g)}\b"
            rf"|(post-)?up\s+ip\s+route\s+add\s+(default|0\.0\.0\.0/0)\s+via\s+{re.escape(g)}\b)",
            text,
            re.M,
        ):
            missing.append(f"no default gateway {g}")
    for m in exp["mtus"]:
        if not re.search(rf"^\s*mtu\s+{m}\s*$", text, re.M):
            missing.append(f"no mtu {m}")
    servers = " ".join(re.findall(r"^\s*dns-nameservers\s+(.*)$", text, re.M)).split()
    for d in exp["dns"]:
        if d not in servers:
            missing.append(f"no dns-nameservers {d}")
    return missing


def check_netplan(root, exp):
    import yaml

    devices = {}
    found_file = False
    for p, t in files_under(root):
        if not p.endswith(".yaml"):
            continue
        found_file = True
        cfg = yaml.safe_load(t) or {}
        net = cfg.get("network", cfg)
        for kind in ("ethernets", "bonds", "bridges", "vlans"):
            devices.update(net.get(kind) or {})
    if not found_file:
        return ["no netplan file written"]
    addrs, gws, mtus, dns = set(), set(), set(), set()
    for dev in devices.values():
        addrs.update(str(ipaddress.ip_interface(a)) for a in dev.get("addresses") or [])
        if dev.get("gateway4"):
            gws.add(str(dev["gateway4"]))
        for r in dev.get("routes") or []:
            if str(r.get("to")) in ("default", "0.0.0.0/0"):
                gws.add(str(r.get("via")))
        if dev.get("mtu") is not None:
            mtus.add(int(dev["mtu"]))
        dns.update(str(a) for a in (dev.get("nameservers") or {}).get("addresses") or [])
    return missing_from(exp, addrs, gws, mtus, dns)


def check_networkd(root, exp):
    addrs, gws, mtus, dns = set(), set(), set(), set()
    found_file = False
    reprs = []
    for p, t in files_under(root):
        if not p.endswith((".network", ".link")):
            continue
        found_file = True
        reprs += python_reprs(t)
        section, route = None, {}
        routes = []
        for line in t.splitlines() + ["[End]"]:
            line = line.strip()
            if line.startswith("["):
                if section == "Route":
                    routes.append(route)
                section, route = line.strip("[]"), {}
                continue
            if "=" not in line or line.startswith("#"):
                continue
            k, v = (s.strip() for s in line.split("=", 1))
            if section == "Route":
                route[k] = v
            elif k == "Address":
                addrs.add(str(ipaddress.ip_interface(v)))
            elif k == "Gateway":
                gws.add(v)
            elif k in ("MTUBytes", "MTU"):
                mtus.add(int(v))
            elif k == "DNS":
                dns.update(v.split())
        for r in routes:
            if r.get("Destination", "0.0.0.0/0") in ("0.0.0.0/0", "::/0") and r.get("Gateway"):
                gws.add(r["Gateway"])
    if not found_file:
        return ["no networkd file written"]
    return reprs + missing_from(exp, addrs, gws, mtus, dns)


def missing_from(exp, addrs, gws, mtus, dns):
    missing = [f"no address {a}" for a in exp["addresses"] if a not in addrs]
    missing += [f"no default gateway {g}" for g in exp["gateways"] if g not in gws]
    missing += [f"no mtu {m}" for m in exp["mtus"] if int(m) not in mtus]
    missing += [f"no dns {d}" for d in exp["dns"] if d not in dns]
    return missing


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------

# What `cloud-init schema` logs about this host rather than about the file it checks: run as
# nobody, 24.1 and later look for a datasource on the host, find none, and say so.
HOST_NOISE = re.compile(
    r"Getting data from <class 'cloudinit\.sources\.DataSourceNone\.DataSourceNone'> failed"
    r"|datasource not detected, using default instance-data/user-data paths"
)
LOG_PROBLEM = re.compile(r"\[(WARNING|ERROR|CRITICAL|DEPRECATED)\]|Traceback|deprecat", re.I)


class Version:
    def __init__(self, label, version, sha, cache):
        self.label, self.version, self.sha = label, version, sha
        self.dir = os.path.join(cache, version)
        self.site = os.path.join(self.dir, SITE)
        self.distro = "ubuntu" if label.startswith("ubuntu") else "debian"
        self.checks = {}  # name -> "ok" | "FAIL: ..." | "n/a: ..."
        self.merged_digest = None
        self.merged_summary = None
        self.seconds = 0.0

    def missing(self):
        marker = os.path.join(self.dir, ".extracted")
        if not os.path.isfile(marker) or open(marker).read().strip() != self.sha:
            return "not fetched"
        if not os.path.isfile(os.path.join(self.site, "cloudinit", "version.py")):
            return "extracted tree has no cloudinit/version.py"
        return None


def read_pins():
    fetch = os.path.join(HERE, "fetch")
    pins = []
    with open(fetch) as f:
        for line in f:
            m = re.match(r'^\s*"([^|"]+)\|([^|"]+)\|([^|"]+)\|([0-9a-f]{64})"\s*$', line)
            if m:
                pins.append((m[1], m[2], m[4]))
    if not pins:
        raise SystemExit(f"check: no PINS found in {fetch}")
    return pins


class Runner:
    def __init__(self, work, drop_privileges):
        self.work = work
        self.drop = drop_privileges

    def run(self, v, argv, chown=False, timeout=PER_CALL_TIMEOUT):
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": self.work,
            "LANG": "C.UTF-8",
            "PYTHONPATH": v.site,
            "PYTHONNOUSERSITE": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        cmd = [HOST_PYTHON] + argv
        if self.drop:
            # The networkd renderer chowns its files to systemd-network: keep CAP_CHOWN alone.
            caps = ["--inh-caps=+chown", "--ambient-caps=+chown"] if chown else []
            cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"] + caps + cmd
        try:
            p = subprocess.run(
                cmd, env=env, cwd=self.work, capture_output=True, text=True, timeout=timeout
            )
            return p.returncode, p.stdout, p.stderr
        except subprocess.TimeoutExpired:
            return -1, "", f"timed out after {timeout}s"

    def cli(self, v, args, chown=False):
        return self.run(v, ["-m", "cloudinit.cmd.main"] + args, chown=chown)


def short(text, n=400):
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


def cli_schema_verdict(rc, out, err):
    """`cloud-init schema -c` prints 'Valid cloud-config'/'Valid schema', or 'Invalid ...' and
    exits 1; newer versions print deprecations yet exit 0."""
    text = "\n".join(line for line in (out + "\n" + err).splitlines() if not HOST_NOISE.search(line))
    if rc != 0 or re.search(r"invalid|error|deprecat|warning|traceback", text, re.I):
        return "FAIL: " + short(text or f"exit {rc}")
    if not re.search(r"^Valid ", out, re.M):
        return "FAIL: no 'Valid' verdict: " + short(text)
    return "ok"


def check_version(v, seed, work, runner, expected):
    start = time.monotonic()
    vdir = os.path.join(work, v.label)
    c = v.checks

    # In-process checks with the version's modules.
    rc, out, err = runner.run(v, [os.path.join(work, "check.py"), "--worker", seed, vdir, v.site, v.distro])
    wfile = os.path.join(vdir, "worker.json")
    if rc != 0 or not os.path.exists(wfile):
        lines = [line for line in (err or out).splitlines() if line.strip()][-3:]
        hint = " (run as nobody: can nobody read the cache?)" if runner.drop else ""
        if "ModuleNotFoundError" in err:
            hint = " (a Python module is missing: run scripts/install-deps.sh)"
        c["worker"] = f"FAIL: the worker could not run under this version (exit {rc}){hint}: " + short(
            " / ".join(lines), 1500
        )
        v.seconds = time.monotonic() - start
        return
    with open(wfile) as f:
        w = json.load(f)
    if w["version"].split("-")[0] not in v.version:
        c["version"] = f"FAIL: the tree reports version {w['version']}, pinned {v.version}"
    for name, verdict in w["checks"].items():
        c[name] = verdict
    if w.get("merged") is not None:
        canon = json.dumps(w["merged"], sort_keys=True, default=str)
        v.merged_digest = hashlib.sha256(canon.encode()).hexdigest()[:12]
        m = w["merged"]
        users = [u if isinstance(u, str) else u.get("name") for u in m.get("users") or []]
        v.merged_summary = {
            "keys": sorted(m),
            "users": users,
            "runcmd": len(m.get("runcmd") or []),
            "users_created": w.get("users"),
            "overridden": {str(p["n"]): p["overridden"] for p in w["parts"] if p.get("overridden")},
        }
    v.parts = [(p["n"], p["type"]) for p in w["parts"]]

    # The CLI's schema command on each cloud-config part and on the merge.
    rc, out, err = runner.cli(v, ["schema", "--help"])
    schema_cmd = ["schema"] if rc == 0 else ["devel", "schema"]
    if rc != 0:
        rc, out, err = runner.cli(v, schema_cmd + ["--help"])
    if rc != 0:
        c["user-data-cli"] = "FAIL: neither `schema` nor `devel schema` runs: " + short(err)
    else:
        has_net_schema = "network-config" in out
        with open(os.path.join(seed, "user-data"), "rb") as f:
            plain = f.read(13) == b"#cloud-config"
        if plain:  # the seed's file itself, as a user would check it
            files = [os.path.join(seed, "user-data")]
        else:  # `schema` takes no MIME multipart: each cloud-config part as the worker cut it
            files = [p["file"] for p in w["parts"] if p.get("file")]
        if w.get("merged_file"):
            files.append(w["merged_file"])
        fails = []
        for file in files:
            verdict = cli_schema_verdict(*runner.cli(v, schema_cmd + ["--config-file", file]))
            if verdict != "ok":
                fails.append(f"{os.path.basename(file)}: {verdict[6:]}")
        if not files:
            c["user-data-cli"] = "n/a: no cloud-config part to give `schema --config-file`"
        else:
            c["user-data-cli"] = "FAIL: " + " | ".join(fails) if fails else "ok"
        if not has_net_schema:
            c["network-schema"] = "n/a: this version's `schema` has no --schema-type network-config"
        else:
            rc, out, err = runner.cli(
                v,
                schema_cmd
                + ["--schema-type", "network-config", "--config-file", f"{seed}/network-config"],
            )
            if rc == 0 and re.search(r"^Skipping network-config schema validation", out, re.M):
                c["network-schema"] = "n/a: " + short(out)
            else:
                c["network-schema"] = cli_schema_verdict(rc, out, err)

    # The renderers, through `devel net-convert`.
    for kind in RENDERERS:
        target = os.path.join(vdir, f"render-{kind}")
        rc, out, err = runner.cli(
            v,
            ["devel", "net-convert", "--debug", "--network-data", f"{seed}/network-config"]
            + ["--kind", "yaml", "--output-kind", kind, "--distro", v.distro, "--directory", target],
            chown=True,
        )
        logged = [line for line in err.splitlines() if LOG_PROBLEM.search(line)]
        if rc != 0:
            tail = [line for line in err.splitlines() if line.strip()][-1:] or [f"exit {rc}"]
            c[f"render-{kind}"] = f"FAIL: net-convert exit {rc}: " + short(tail[0])
        elif logged:
            c[f"render-{kind}"] = "FAIL: net-convert logged: " + short("; ".join(logged))
        else:
            try:
                missing = {"eni": check_eni, "netplan": check_netplan, "networkd": check_networkd}[
                    kind
                ](target, expected)
            except Exception as e:
                missing = [f"reading the output: {type(e).__name__}: {e}"]
            c[f"render-{kind}"] = "FAIL: rendered output: " + ", ".join(missing) if missing else "ok"
    v.seconds = time.monotonic() - start


def main():
    if os.path.realpath(sys.executable) != os.path.realpath(HOST_PYTHON) and os.path.exists(
        HOST_PYTHON
    ):
        os.execv(HOST_PYTHON, [HOST_PYTHON, os.path.abspath(__file__)] + sys.argv[1:])
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        return worker(*sys.argv[2:6])

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("seed_dir")
    ap.add_argument("--cache", default=DEFAULT_CACHE, help=f"fetch's cache (default {DEFAULT_CACHE})")
    ap.add_argument("--versions", help="comma-separated labels or versions (default: all pinned)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--keep", action="store_true", help="keep the work directory and print it")
    args = ap.parse_args()

    seed_in = os.path.abspath(args.seed_dir)
    for name in ("meta-data", "user-data", "network-config"):
        if not os.path.isfile(os.path.join(seed_in, name)):
            print(f"check: {seed_in} has no {name}", file=sys.stderr)
            return 2

    versions = [Version(label, ver, sha, args.cache) for label, ver, sha in read_pins()]
    if args.versions:
        wanted = [w.strip() for w in args.versions.split(",") if w.strip()]
        unknown = [w for w in wanted if not any(w in (v.label, v.version) for v in versions)]
        if unknown:
            known = ", ".join(f"{v.label} ({v.version})" for v in versions)
            print(f"check: unknown version(s) {', '.join(unknown)}; pinned: {known}", file=sys.stderr)
            return 2
        versions = [v for v in versions if v.label in wanted or v.version in wanted]

    drop = os.getuid() == 0
    if drop and not shutil.which("setpriv"):
        print("check: running as root needs setpriv (util-linux) to run cloud-init as nobody", file=sys.stderr)
        return 2
    work = tempfile.mkdtemp(prefix="shoal-ci-check-")
    started = time.monotonic()
    try:
        seed = os.path.join(work, "seed")
        os.mkdir(seed)
        for name in ("meta-data", "user-data", "network-config"):
            shutil.copyfile(os.path.join(seed_in, name), os.path.join(seed, name))
        # The worker runs as nobody too, who may not read this checkout.
        shutil.copyfile(os.path.abspath(__file__), os.path.join(work, "check.py"))
        for v in versions:
            os.mkdir(os.path.join(work, v.label))
        if drop:
            for d, dirs, files in os.walk(work):
                for n in [d] + [os.path.join(d, x) for x in dirs + files]:
                    os.chown(n, NOBODY, NOBODY)
        os.chmod(work, 0o755)
        try:
            expected = expected_network(os.path.join(seed, "network-config"))
        except Exception as e:
            expected = None
            expected_error = f"{type(e).__name__}: {e}"
        runner = Runner(work, drop)

        runnable = []
        for v in versions:
            why = v.missing()
            if why:
                v.checks["fetch"] = (
                    f"FAIL: {why} in {v.dir}: run scripts/cloud-init/fetch {args.cache}"
                )
            elif expected is None:
                v.checks["network-config"] = f"FAIL: cannot read the seed's network-config: {expected_error}"
            else:
                runnable.append(v)
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            futures = {pool.submit(check_version, v, seed, work, runner, expected): v for v in runnable}
            for fut in concurrent.futures.as_completed(futures):
                v = futures[fut]
                try:
                    fut.result()
                except Exception as e:
                    v.checks["run"] = f"FAIL: the checker itself failed: {type(e).__name__}: {e}"

        width = max(len(v.label) for v in versions) if versions else 10
        vwidth = max(len(v.version) for v in versions) if versions else 10
        failed = 0
        for v in versions:
            v.checks = {name: " ".join(verdict.split()) for name, verdict in v.checks.items()}
            for name, verdict in v.checks.items():
                print(f"{v.label:<{width}}  {v.version:<{vwidth}}  {name:<16} {verdict}")
                failed += verdict.startswith("FAIL")
        merges = {v.label: v.merged_digest for v in versions if v.merged_digest}
        same_merge = len(set(merges.values())) <= 1
        if merges and not same_merge:
            print("check: the versions merge the user-data differently:", file=sys.stderr)
            for v in versions:
                if v.merged_digest:
                    print(f"  {v.label}: {json.dumps(v.merged_summary)}", file=sys.stderr)
        unrunnable = [v.label for v in versions if "fetch" in v.checks or "worker" in v.checks]
        summary = {
            "seed": seed_in,
            "ok": failed == 0 and bool(versions),
            "failed_checks": failed,
            "versions_not_run": unrunnable,
            "same_merge_everywhere": same_merge,
            "seconds": round(time.monotonic() - started, 1),
            "versions": {
                v.label: {
                    "version": v.version,
                    "ok": all(not x.startswith("FAIL") for x in v.checks.values()),
                    "checks": v.checks,
                    "parts": getattr(v, "parts", None),
                    "merged": v.merged_summary,
                    "merged_sha256_12": v.merged_digest,
                    "seconds": round(v.seconds, 1),
                }
                for v in versions
            },
        }
        print(json.dumps(summary, sort_keys=True))
        if not versions:
            print("check: no version selected", file=sys.stderr)
            return 2
        if unrunnable:
            print(f"check: could not run {', '.join(unrunnable)}", file=sys.stderr)
            return 2
        return 1 if failed else 0
    finally:
        if args.keep:
            print(f"check: work directory kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
