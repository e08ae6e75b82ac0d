"""Shared guest probes for the checks: each runs one fixed command (cached per context) and parses it.

The command strings are constants so the unit tests' guest double can answer them, so the unit tests can
run the very same strings under /bin/sh against a planted file tree (tests/fakeroot.py), and so a reader
of a report can paste the command from the evidence into a shell in the guest.

Every probe fails closed (:meth:`CheckContext.probe`): a probe that did not work raises
:class:`ProbeFailed` and its check is an error. "It does not exist" is an answer the probe prints
(:data:`ABSENT`), never an exit code that a refused sudo or a read error could also produce.
"""

from __future__ import annotations

import contextlib
import json
import re
import shlex
from dataclasses import dataclass
from typing import Any

from imagekit.checks.registry import ABSENT, PROBE_OK, CheckContext
from imagekit.config.distros import Agent
from imagekit.provision.resource_setup import ResourceDiskPlan, plan_for
from imagekit.vm.guest import CommandResult


def read_file(path: str) -> str:
    """Shell: print ``path`` (or an :data:`ABSENT` line when it does not exist), then :data:`PROBE_OK`."""
    q = shlex.quote(path)
    return f"if [ -e {q} ]; then cat -- {q}; else echo '{ABSENT}' {q}; fi && echo {PROBE_OK}"


def if_exists(path: str, command: str) -> str:
    """Shell: ``command`` when ``path`` exists, else an :data:`ABSENT` line naming it."""
    q = shlex.quote(path)
    return f"if [ -e {q} ]; then {command}; else echo '{ABSENT}' {q}; fi"


def readlink_cmd(device: str) -> str:
    return if_exists(device, f"readlink -e {shlex.quote(device)}")


WAAGENT_CONF = read_file("/etc/waagent.conf")
LSBLK = "lsblk -J -b -p -o NAME,KNAME,PKNAME,TYPE,SIZE,FSTYPE,MOUNTPOINT,SERIAL"
ROOT_SOURCE = "findmnt -n -o SOURCE,FSTYPE /"
MOUNTS = "findmnt -rn -o TARGET,SOURCE,FSTYPE,OPTIONS"
PROC_SWAPS = "cat /proc/swaps"
FSTAB = read_file("/etc/fstab")
SSHD_T = "sshd -T 2>&1 || /usr/sbin/sshd -T"
CMDLINE = "cat /proc/cmdline"
WAAGENT_VERSION = "waagent --version 2>&1 || /usr/sbin/waagent --version"


def file_text(ctx: CheckContext, path: str) -> tuple[str | None, CommandResult]:
    """A guest file's text, or None when it does not exist; a read that failed raises ProbeFailed."""
    res = ctx.probe(read_file(path), marker=True)
    return (None if res.stdout.startswith(ABSENT) else res.stdout), res


def resource_plan(ctx: CheckContext) -> ResourceDiskPlan:
    return ctx.plan if ctx.plan is not None else plan_for(ctx.distro)


# --- waagent.conf -------------------------------------------------------------------------------------


def parse_waagent_conf(text: str) -> dict[str, str]:
    """``Key=Value`` lines as waagent reads them (comments and blanks ignored; later keys win)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if "=" in line:
            key, value = line.split("=", 1)
            out[key.strip()] = value.strip().strip('"')
    return out


def waagent_conf(ctx: CheckContext) -> tuple[dict[str, str] | None, CommandResult]:
    """/etc/waagent.conf's settings, or None when the file does not exist."""
    text, res = file_text(ctx, "/etc/waagent.conf")
    return (None if text is None else parse_waagent_conf(text)), res


def conf_lines(res: CommandResult, prefixes: tuple[str, ...]) -> str:
    """Only the waagent.conf lines with these key prefixes, as compact evidence."""
    lines = [ln for ln in res.stdout.splitlines() if ln.strip().startswith(prefixes)]
    return f"$ {res.command}  (lines {', '.join(p + '*' for p in prefixes)})\n" + "\n".join(lines)


@dataclass(frozen=True)
class Expected:
    """What the agent was configured to do with the resource disk (from the guest's own config)."""

    formatted: bool
    mount_point: str
    filesystem: str
    swap: str  # none | file | partition
    swap_mib: int
    source: str  # where that came from, for the evidence


def expected_resource_disk(ctx: CheckContext) -> tuple[Expected, list[CommandResult | str]]:
    """waagent: the guest's /etc/waagent.conf (what the agent obeys; waagent's own defaults for missing
    keys); cloud-init: the plan the run's CustomData was made from."""
    plan = resource_plan(ctx)
    if ctx.distro.agent is Agent.WAAGENT:
        conf, res = waagent_conf(ctx)
        if conf is None:
            # Nothing says what the agent was told to do: the resource-disk checks cannot judge.
            raise ctx.probe_failed("/etc/waagent.conf does not exist, so what waagent was configured to do "
                                   "with the resource disk is unknown", res)
        formatted = conf.get("ResourceDisk.Format", "n").lower().startswith("y")
        swap = formatted and conf.get("ResourceDisk.EnableSwap", "n").lower().startswith("y")
        try:
            size = int(conf.get("ResourceDisk.SwapSizeMB", "0"))
        except ValueError:
            size = 0
        exp = Expected(formatted, conf.get("ResourceDisk.MountPoint", "/mnt/resource"),
                       conf.get("ResourceDisk.Filesystem", "ext3"), "file" if swap else "none",
                       size if swap else 0, "/etc/waagent.conf in the guest")
        return exp, [conf_lines(res, ("ResourceDisk.",))]
    desc = (f"the CustomData cloud-config of this run (mount {plan.mount_point}, {plan.filesystem}, swap "
            f"{plan.swap}{f' {plan.swap_percent}%' if plan.swap == 'partition' else ''})")
    return Expected(plan.formatted, plan.mount_point, plan.filesystem, plan.swap, plan.swap_mib, desc), [desc]


# --- block devices ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockDev:
    name: str
    type: str
    size: int
    fstype: str
    mountpoint: str
    serial: str
    disk: str  # the top-level disk this device lives on (itself for a disk)


def _flatten(nodes: list[dict[str, Any]], disk: str | None, out: dict[str, BlockDev]) -> None:
    for n in nodes:
        name = str(n.get("name") or n.get("kname") or "")
        top = disk or name
        out[name] = BlockDev(
            name=name, type=str(n.get("type") or ""), size=int(n.get("size") or 0),
            fstype=str(n.get("fstype") or ""), mountpoint=str(n.get("mountpoint") or ""),
            serial=str(n.get("serial") or "").strip(), disk=top,
        )
        kname = str(n.get("kname") or "")
        if kname and kname not in out:
            out[kname] = out[name]
        _flatten(list(n.get("children") or []), top, out)


def topology(ctx: CheckContext) -> tuple[dict[str, BlockDev], CommandResult]:
    """The block devices by name, and as evidence the command with a compact rendering of its JSON."""
    res = ctx.probe(LSBLK)
    out: dict[str, BlockDev] = {}
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        _flatten(list(json.loads(res.stdout).get("blockdevices") or []), None, out)
    if not out:
        raise ctx.probe_failed("lsblk listed no block device (no JSON with blockdevices)", res)
    lines = []
    for name, d in out.items():
        if name != d.name:
            continue
        indent = "" if d.type == "disk" or d.disk == name else "  "
        extra = " ".join(x for x in (d.fstype, d.mountpoint, f"serial={d.serial}" if d.serial else "") if x)
        lines.append(f"{indent}{name} {d.type} {d.size / 1024**2:.0f} MiB {extra}".rstrip())
    text = "(JSON output, shown as a tree)\n" + "\n".join(lines)
    compact = CommandResult(res.command, res.returncode, text, res.stderr)
    return out, compact


def os_disk(ctx: CheckContext) -> tuple[str | None, list[CommandResult]]:
    """The disk that holds the root filesystem (e.g. /dev/sda)."""
    devs, lsblk = topology(ctx)
    root = ctx.probe(ROOT_SOURCE)
    src = root.stdout.split()[0]
    dev = devs.get(src)
    return (dev.disk if dev else None), [root, lsblk]


def resource_disk(ctx: CheckContext) -> tuple[str | None, CommandResult]:
    """The attached resource disk's kernel device (e.g. /dev/sdb), or None if it is absent."""
    plan = resource_plan(ctx)
    res = ctx.probe(readlink_cmd(plan.device))
    name = res.stdout.strip()
    if name.startswith(ABSENT):
        return None, res
    if not name.startswith("/dev/"):
        raise ctx.probe_failed(f"readlink named no device under /dev for {plan.device}", res)
    return name, res


@dataclass(frozen=True)
class Mount:
    target: str
    source: str
    fstype: str
    options: str


def _unhex(field: str) -> str:
    # findmnt -r writes spaces and other unsafe bytes as \xHH
    return re.sub(r"\\x([0-9a-fA-F]{2})", lambda m: chr(int(m.group(1), 16)), field)


def mount_at(ctx: CheckContext, target: str) -> tuple[Mount | None, CommandResult]:
    """What is mounted at ``target`` (the topmost mount there), or None; evidence is that row only."""
    res = ctx.probe(MOUNTS)
    rows = [Mount(*map(_unhex, f[:4])) for f in (ln.split() for ln in res.stdout.splitlines()) if len(f) >= 4]
    if not any(m.target == "/" for m in rows):
        raise ctx.probe_failed("findmnt listed no mount at / (an empty or unreadable mount table)", res)
    hits = [m for m in rows if m.target == target.rstrip("/") or (target == "/" and m.target == "/")]
    found = hits[-1] if hits else None
    shown = (f"{found.target} {found.source} {found.fstype} {found.options}" if found
             else f"(nothing mounted at {target} among {len(rows)} mounts)")
    return found, CommandResult(res.command, res.returncode, shown + "\n", res.stderr)


def disk_of(ctx: CheckContext, device: str) -> str | None:
    devs, _ = topology(ctx)
    dev = devs.get(device)
    return dev.disk if dev else None


@dataclass(frozen=True)
class Swap:
    name: str
    type: str  # file | partition
    size_kib: int


def swaps(ctx: CheckContext) -> tuple[list[Swap], CommandResult]:
    res = ctx.probe(PROC_SWAPS)
    if not res.stdout.startswith("Filename"):
        raise ctx.probe_failed("/proc/swaps has no header line (Filename Type Size ...)", res)
    out = []
    for line in res.stdout.splitlines()[1:]:
        f = line.split()
        if len(f) >= 3 and f[2].isdigit():
            # /proc/swaps escapes spaces in names as \040
            out.append(Swap(f[0].replace("\\040", " "), f[1], int(f[2])))
    return out, res


def backing_device(ctx: CheckContext, path: str) -> tuple[str | None, CommandResult]:
    """The block device of the filesystem holding ``path``."""
    res = ctx.probe(f"findmnt -n -o SOURCE --target {shlex.quote(path)}")
    return res.stdout.split()[0], res


def sshd_config(ctx: CheckContext) -> tuple[dict[str, str], CommandResult]:
    """``sshd -T``: the effective sshd settings (lower-case keys; first value wins as in sshd)."""
    res = ctx.probe(SSHD_T)
    out: dict[str, str] = {}
    for line in res.stdout.splitlines():
        parts = line.strip().split(None, 1)
        if len(parts) == 2 and re.match(r"^[a-z0-9]+$", parts[0]):
            out.setdefault(parts[0], parts[1])
    if "port" not in out:  # sshd -T always prints its port; without it, the output is an error message
        raise ctx.probe_failed("sshd -T printed no settings", res)
    return out, res


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:4])


def key_id(key: str) -> tuple[str, str] | None:
    """(type, base64 body) of an OpenSSH public key line, ignoring options and comment."""
    m = re.search(r"((?:ssh|ecdsa|sk)-[\w@.-]+)\s+([A-Za-z0-9+/=]+)", key)
    return (m.group(1), m.group(2)) if m else None
