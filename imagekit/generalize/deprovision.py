"""Generalize a provisioned VM, prove each step did what it claims, then scan the captured disk offline.

In the guest (:func:`deprovision`): the distro table's ``deprovision`` commands (``waagent -force
-deprovision+user``; for cloud-init images ``cloud-init clean`` first, as Azure's docs do), then imagekit's
own generalize steps for what those agents leave behind (the provisioned user's sudoers lines written by
cloud-init, root's shell history, the machine-id, and logs that name the user). Everything runs as **one**
root shell script: ``-deprovision+user`` deletes the very user we are logged in as, after which ``sudo``
no longer works for that session, so each step's verification has to happen inside the same root shell.
Every step reports its exit code and every claim it makes (user gone, /var/lib/waagent gone, cloud-init
instance state gone, host keys gone, machine-id empty, histories gone ...) is tested right after it.

On the host (:func:`scan_image`): the captured disk is read without booting it. Each Linux partition is
mounted read-only (``ro,noload`` for ext4, so not even the journal is replayed) through a loop device with
the partition's offset, inside a private mount namespace created for the scan: if the scan dies, the
kernel drops the mount and the auto-clearing loop device with the namespace. The partitions are put
together as the image's own /etc/fstab says, so a separate /home or /var is scanned where it belongs. The rules live in
:mod:`imagekit.scan.rules`; a finding fails the build and names the file.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imagekit.config.distros import Agent, Distro
from imagekit.core.errors import BuildError
from imagekit.core.log import Timings, step
from imagekit.core.paths import REPO_ROOT
from imagekit.core.run import require, run
from imagekit.scan.rules import Finding, ScanInput
from imagekit.vm.guest import Guest

log = logging.getLogger("imagekit.generalize.deprovision")

_USER_RE = r"^[a-z_][a-z0-9_-]*[$]?$"


class LeakFound(BuildError):
    """The offline scan found something that must not ship."""

    def __init__(self, image: Path, findings: list[Finding]) -> None:
        self.findings = findings
        lines = "\n".join(f"  - {f}" for f in findings[:60])
        more = f"\n  … and {len(findings) - 60} more" if len(findings) > 60 else ""
        super().__init__(f"{image}: the offline scan found {len(findings)} thing(s) that must not ship:\n{lines}{more}",
                         hint="the image was not deprovisioned (or not completely); nothing was registered")


# --- in the guest -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """Something a step says it did, and a shell test that succeeds when it is true."""

    what: str
    test: str


@dataclass(frozen=True)
class Step:
    name: str
    command: str  # shell text
    source: str  # "distro table" or "imagekit"
    claims: tuple[Claim, ...] = ()


@dataclass
class ClaimResult:
    what: str
    ok: bool
    evidence: str = ""


@dataclass
class StepResult:
    name: str
    command: str
    source: str
    returncode: int | None = None
    output: str = ""
    claims: list[ClaimResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and all(c.ok for c in self.claims)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "command": self.command, "source": self.source, "returncode": self.returncode,
                "ok": self.ok, "claims": [{"what": c.what, "ok": c.ok, "evidence": c.evidence} for c in self.claims],
                "output": self.output[-2000:]}


@dataclass
class DeprovisionReport:
    steps: list[StepResult]
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return bool(self.steps) and all(s.ok for s in self.steps)

    def failures(self) -> list[str]:
        out = []
        for s in self.steps:
            if s.returncode is None:
                out.append(f"{s.name}: did not run (an earlier step failed)")
            elif s.returncode != 0:
                out.append(f"{s.name}: `{s.command}` exited {s.returncode}: {s.output.strip()[-500:]}")
            out += [f"{s.name}: claim not true: {c.what} ({c.evidence.strip()[:300]})" for c in s.claims if not c.ok]
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "seconds": round(self.seconds, 1), "steps": [s.as_dict() for s in self.steps]}


def _no_file_names(q: str, paths: str, recursive: bool = False) -> str:
    """Shell: true when no existing file among ``paths`` (a shell word list) holds the word ``q``; false
    when one does *or grep fails* (an unreadable file proves nothing: grep exits 2, not 1 for "no match")."""
    flags = "-rqw" if recursive else "-qw"
    return (f"for f in {paths}; do [ -e \"$f\" ] || continue; grep {flags} -- {q} \"$f\"; "
            "[ $? -eq 1 ] || exit 1; done")


def _none_exist(globs: str) -> str:
    """Shell: true when nothing matches any of ``globs`` (``! ls a b`` would also be true when only one
    of them is missing, because ls then exits non-zero whatever else it found)."""
    return f"for f in {globs}; do if [ -e \"$f\" ] || [ -L \"$f\" ]; then exit 1; fi; done"


def _conf_is(key: str, value: str) -> str:
    """Shell: true when waagent.conf sets ``key`` to ``value`` (the last assignment wins, as waagent reads it)."""
    return f'[ "$(sed -n "s/^{key}=//p" /etc/waagent.conf 2>/dev/null | tail -n1 | tr -d " ")" = {value} ]'


def _table_step(argv: tuple[str, ...], username: str) -> Step:
    cmd = shlex.join(argv)
    q = shlex.quote(username)
    claims: list[Claim] = []
    prog = os.path.basename(argv[0])
    if prog == "waagent" and any(a.startswith("-deprovision") for a in argv):
        claims += [
            Claim("/var/lib/waagent is gone (provisioned marker, ovf-env.xml, goal state)",
                  "[ ! -e /var/lib/waagent/provisioned ] && [ ! -e /var/lib/waagent/ovf-env.xml ] && "
                  "[ -z \"$(ls -A /var/lib/waagent 2>/dev/null)\" ]"),
            Claim("/var/log/waagent.log is gone", "[ ! -e /var/log/waagent.log ]"),
            Claim("root's shell history is gone", "[ ! -e /root/.bash_history ]"),
            Claim("DHCP leases are gone", _none_exist("/var/lib/dhcp/*lease* /var/lib/dhclient/*")),
            Claim("SSH host keys are gone (Provisioning.RegenerateSshHostKeyPair=y)",
                  f"! {_conf_is('Provisioning.RegenerateSshHostKeyPair', 'y')} || "
                  f"{{ {_none_exist('/etc/ssh/ssh_host_*key*')}; }}"),
            Claim("root's password is locked (Provisioning.DeleteRootPassword=y)",
                  f"! {_conf_is('Provisioning.DeleteRootPassword', 'y')} || "
                  "! grep -q '^root:[$]' /etc/shadow"),
        ]
        if "-deprovision+user" in argv:
            claims += [
                # getent exits 2 for "no such user"; any other failure proves nothing
                Claim(f"user {username} is gone", f"getent passwd {q} >/dev/null; [ $? -eq 2 ]"),
                Claim(f"/home/{username} is gone", f"[ ! -e /home/{q} ]"),
                Claim(f"no waagent sudoers line for {username}",
                      _no_file_names(q, "/etc/sudoers.d/waagent")),
            ]
    elif prog == "cloud-init" and "clean" in argv:
        claims.append(Claim("cloud-init instance state is gone (/var/lib/cloud/instance, instances/)",
                            "[ ! -e /var/lib/cloud/instance ] && "
                            "[ -z \"$(ls -A /var/lib/cloud/instances 2>/dev/null)\" ]"))
        if "--logs" in argv or "-l" in argv:
            claims.append(Claim("cloud-init's logs are gone",
                                "[ ! -e /var/log/cloud-init.log ] && [ ! -e /var/log/cloud-init-output.log ]"))
        if "--machine-id" in argv:
            claims.append(Claim("/etc/machine-id is empty or 'uninitialized'",
                                "[ ! -s /etc/machine-id ] || grep -qx uninitialized /etc/machine-id"))
    return Step(name=cmd, command=cmd, source="distro table", claims=tuple(claims))


def plan(distro: Distro, username: str) -> list[Step]:
    """The steps for ``distro``: the table's commands, then imagekit's own generalize steps."""
    if not re.match(_USER_RE, username):
        raise BuildError(f"refusing to deprovision: {username!r} is not a valid user name")
    q = shlex.quote(username)
    steps = [_table_step(argv, username) for argv in distro.deprovision]
    steps += [
        Step("drop sudoers lines for the provisioned user",
             # cloud-init writes /etc/sudoers.d/90-cloud-init-users; neither agent's clean-up removes it
             f"for f in /etc/sudoers.d/*; do [ -f \"$f\" ] || continue; grep -qw -- {q} \"$f\" || continue; "
             f"sed -i \"/\\b{username}\\b/d\" \"$f\"; echo \"edited $f\"; "
             "grep -qv '^[[:space:]]*\\(#.*\\)\\?$' \"$f\" || { rm -f \"$f\"; echo \"removed $f (now empty)\"; }; done",
             "imagekit",
             (Claim(f"no sudoers rule names {username}",
                    _no_file_names(q, "/etc/sudoers /etc/sudoers.d", recursive=True)),
              Claim("sudoers still parses", "visudo -c >/dev/null 2>&1 || ! command -v visudo >/dev/null"))),
        Step("drop root's login-refusal keys",
             # cloud-init's disable_root puts the user's key into root's authorized_keys behind a command
             # that says "Please login as the user <name>": the build user's key and name must not ship
             "f=/root/.ssh/authorized_keys; [ -f $f ] || exit 0; "
             f"sed -i \"/\\b{username}\\b/d\" $f; grep -q . $f || rm -f $f",
             "imagekit",
             (Claim(f"root's authorized_keys does not name {username}",
                    _no_file_names(q, "/root/.ssh/authorized_keys")),)),
        Step("replace the account-file backups",
             # useradd/userdel leave /etc/passwd- etc. holding the previous contents, i.e. the deleted user
             "for f in passwd group shadow gshadow subuid subgid; do [ -f /etc/$f ] || continue; "
             "if [ -f /etc/$f- ]; then cp -p /etc/$f /etc/$f-; fi; done",
             "imagekit",
             (Claim(f"no account-file backup names {username}",
                    _no_file_names(q, "/etc/passwd- /etc/group- /etc/shadow- /etc/gshadow- /etc/subuid- "
                                   "/etc/subgid-")),)),
        Step("remove DHCP leases again at shutdown",
             # dhclient keeps running (our SSH session needs the network) and writes its lease file again,
             # last when the interface goes down at shutdown; a unit that lives in /run (gone at the next
             # boot) and is ordered before the network stops after it and removes the leases then
             "mkdir -p /run/systemd/system && cat > /run/systemd/system/ik-generalize-leases.service <<'EOF'\n"
             # network-pre.target is pulled in so that ifup@<nic>.service (After=network-pre.target) is
             # stopped before it; the ExecStop also waits for dhclient to exit, whatever manages it
             "[Unit]\nDescription=Remove DHCP leases after the network is down (image capture)\n"
             "DefaultDependencies=no\nWants=network-pre.target\nAfter=local-fs.target\n"
             "Before=network-pre.target networking.service NetworkManager.service systemd-networkd.service "
             "shutdown.target\nConflicts=shutdown.target\n"
             "[Service]\nType=oneshot\nRemainAfterExit=yes\nExecStart=/bin/true\nTimeoutStopSec=30\n"
             # ($$ because systemd expands $NAME in Exec lines itself)
             "ExecStop=/bin/sh -c 'i=0; while [ $$i -lt 100 ] && pgrep -x dhclient >/dev/null 2>&1; do "
             "sleep 0.2; i=$$((i+1)); done; rm -rf /var/lib/dhcp/* /var/lib/dhclient/* "
             "/var/lib/NetworkManager/*lease*'\n"
             "EOF\n"
             "systemctl daemon-reload && systemctl start ik-generalize-leases.service && "
             "rm -rf /var/lib/dhcp/* /var/lib/dhclient/*",
             "imagekit",
             (Claim("the lease clean-up unit is active", "systemctl is-active -q ik-generalize-leases.service"),)),
        Step("remove shell histories",
             "rm -f /root/.*_history /root/.lesshst /root/.viminfo",
             "imagekit",
             (Claim("no shell history under /root",
                    _none_exist("/root/.*_history /root/.lesshst /root/.viminfo")),)),
        Step("empty the machine-id",
             # empty = "first boot": systemd makes a new id on the new VM (as Debian's cloud images ship it)
             ": > /etc/machine-id && { [ -L /var/lib/dbus/machine-id ] || rm -f /var/lib/dbus/machine-id; }",
             "imagekit",
             (Claim("/etc/machine-id is empty", "[ -f /etc/machine-id ] && [ ! -s /etc/machine-id ]"),)),
        Step("remove logs that name the provisioned user",
             # the journal goes to /run for the rest of this boot, so the shutdown's own messages
             # (sshd: "Disconnected from user ...") never reach the disk
             "journalctl --relinquish-var >/dev/null 2>&1 || true; "
             "rm -rf /var/log/journal/*/; "
             "for f in /var/log/wtmp /var/log/btmp /var/log/lastlog; do [ -f \"$f\" ] && : > \"$f\"; done; "
             f"grep -rlw -- {q} /var/log 2>/dev/null | while IFS= read -r f; do : > \"$f\"; echo \"emptied $f\"; done; "
             "true",
             "imagekit",
             (Claim(f"no file under /var/log names {username}", _no_file_names(q, "/var/log", recursive=True)),)),
        Step("flush to disk", "sync", "imagekit"),
    ]
    return steps


def render_script(steps: list[Step], token: str) -> str:
    """One POSIX shell script: each step, its exit code, then each claim's result between markers."""
    m = f"@@{token}"
    # The claims read root-only files (shadow, sudoers, /root): run as anyone else, "it is gone" proves nothing.
    lines = ["exec 2>&1", f"[ \"$(id -u)\" -eq 0 ] || {{ echo '{m} not-root'; exit 1; }}"]
    for i, s in enumerate(steps):
        lines.append(f"echo '{m} step {i}'")
        lines.append(f"( {s.command} ); rc=$?")
        lines.append(f"echo \"{m} rc {i} $rc\"")
        for j, c in enumerate(s.claims):
            lines.append(f"if ( {c.test} ) >/dev/null 2>&1; then echo '{m} claim {i} {j} ok'; "
                         f"else echo '{m} claim {i} {j} fail'; fi")
        lines.append(f"[ \"$rc\" -eq 0 ] || {{ echo '{m} abort'; exit 0; }}")
    lines.append(f"echo '{m} end'")
    return "\n".join(lines) + "\n"


def parse_output(steps: list[Step], text: str, token: str) -> list[StepResult]:
    m = f"@@{token} "
    results = [StepResult(s.name, s.command, s.source) for s in steps]
    current: StepResult | None = None
    for line in text.splitlines():
        if not line.startswith(m):
            if current is not None:
                current.output += line + "\n"
            continue
        parts = line[len(m):].split()
        if parts[0] == "step":
            current = results[int(parts[1])]
        elif parts[0] == "rc":
            results[int(parts[1])].returncode = int(parts[2])
        elif parts[0] == "claim":
            s = steps[int(parts[1])]
            c = s.claims[int(parts[2])]
            results[int(parts[1])].claims.append(ClaimResult(c.what, parts[3] == "ok", "" if parts[3] == "ok"
                                                             else f"test failed: {c.test}"))
            current = None
    return results


def _precheck(guest: Guest, distro: Distro, username: str) -> None:
    """What the steps rely on must be there before they run, or "it is gone" would prove nothing."""
    q = shlex.quote(username)
    needs = [(f"getent passwd {q}", f"user {username} exists"), (f"test -d /home/{q}", f"/home/{username} exists")]
    if any(os.path.basename(a[0]) == "waagent" and "-deprovision+user" in a for a in distro.deprovision):
        needs.append(("test -s /var/lib/waagent/ovf-env.xml",
                      "/var/lib/waagent/ovf-env.xml exists (waagent reads the user to delete from it)"))
    if distro.agent is Agent.CLOUD_INIT:
        needs.append(("test -e /var/lib/cloud/instance", "cloud-init instance state exists"))
    missing = [what for cmd, what in needs if not guest.run(cmd).ok]
    if missing:
        raise BuildError("cannot deprovision: expected before the first step: " + "; ".join(missing))


def deprovision(guest: Guest, distro: Distro, username: str, timings: Timings | None = None) -> DeprovisionReport:
    """Run and verify every deprovision step in the guest; raises :class:`BuildError` if any fails.

    This must be the last thing done over this SSH session: afterwards the login user no longer exists.
    """
    steps = plan(distro, username)
    with step("deprovision", timings):
        start = time.monotonic()
        _precheck(guest, distro, username)
        token = secrets.token_hex(6)
        res = guest.run(render_script(steps, token), sudo=True, timeout=600)
        text = res.stdout + res.stderr
        if not any(f"@@{token} {end}" in text.splitlines() for end in ("end", "abort")):
            # the script did not run to its end (sudo refused, not root, killed): nothing it says can be trusted
            tail = "\n".join(f"  | {ln}" for ln in text.strip().splitlines()[-15:])
            why = "it ran as a user other than root" if f"@@{token} not-root" in text else f"exit code {res.returncode}"
            raise BuildError(f"the deprovisioning script did not run to its end ({why}); nothing was verified"
                             + (f":\n{tail}" if tail else ""))
        results = parse_output(steps, text, token)
        report = DeprovisionReport(results, time.monotonic() - start)
        for r in results:
            log.info("  %s %s (%s)%s", "✔" if r.ok else "✘", r.name, r.source,
                     "".join(f"\n      {'✔' if c.ok else '✘'} {c.what}" for c in r.claims))
        if not report.ok:
            raise BuildError("deprovisioning did not do what it claims:\n" +
                             "\n".join(f"  - {x}" for x in report.failures()))
    return report


# --- offline, on the host ---------------------------------------------------------------------------

# partition types we scan: MBR Linux, GPT Linux filesystem / root (x86-64)
_LINUX_TYPES = {"83", "0FC63DAF-8483-4772-8E79-3D69D8477DE4", "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"}


@dataclass(frozen=True)
class Partition:
    offset: int
    size: int
    fstype: str
    uuid: str = ""  # the file system's
    label: str = ""
    partuuid: str = ""  # the partition table's (GPT partition GUID, or MBR disk id + number)


def find_partitions(image: Path, raw_size: int) -> list[Partition]:
    """Linux filesystems in a raw disk image (``raw_size``: its length without a VHD footer)."""
    require("sfdisk", "blkid")
    res = run(["sfdisk", "--json", image], check=False)
    parts: list[tuple[int, int, str]] = []
    if res.returncode == 0 and res.stdout.strip():
        table = json.loads(res.stdout)["partitiontable"]
        sector = int(table.get("sectorsize", 512))
        disk_id = str(table.get("id", "")).lower().removeprefix("0x")
        for n, p in enumerate(table.get("partitions", []), 1):
            if str(p.get("type", "")).upper() in _LINUX_TYPES:
                partuuid = str(p.get("uuid", "")).lower() or (f"{disk_id}-{n:02x}" if disk_id else "")
                parts.append((int(p["start"]) * sector, int(p["size"]) * sector, partuuid))
    else:
        parts.append((0, raw_size, ""))  # a bare filesystem, no partition table
    out = []
    for offset, size, partuuid in parts:
        info = run(["blkid", "-p", "-O", str(offset), "-o", "export", image], check=False).stdout
        fields = dict(line.split("=", 1) for line in info.splitlines() if "=" in line)
        if fields.get("TYPE"):
            out.append(Partition(offset, size, fields["TYPE"], fields.get("UUID", "").lower(),
                                 fields.get("LABEL", ""), partuuid))
    return out


def fstab_mounts(fstab: str) -> list[tuple[str, str]]:
    """(source, mount point) of the file systems an image's /etc/fstab mounts below ``/``, shallowest
    first (so /var is in place before /var/log); swap, pseudo file systems and ``/`` itself left out."""
    out = []
    for line in fstab.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) < 3 or not fields[1].startswith("/") or fields[1] == "/":
            continue
        if fields[2] in ("swap", "none", "proc", "sysfs", "tmpfs", "devpts", "bind") or "bind" in fields[3:4]:
            continue
        mountpoint = os.path.normpath(fields[1].replace("\\040", " "))
        out.append((fields[0], mountpoint))
    return sorted(out, key=lambda sm: sm[1].count("/"))


def _matches(source: str, p: Partition) -> bool:
    """Whether an fstab source names this partition (UUID=, LABEL=, PARTUUID= or their /dev/disk/by-* links)."""
    kind, _, value = source.partition("=")
    if not value:
        for prefix, k in (("/dev/disk/by-uuid/", "UUID"), ("/dev/disk/by-label/", "LABEL"),
                          ("/dev/disk/by-partuuid/", "PARTUUID")):
            if source.startswith(prefix):
                kind, value = k, source[len(prefix):]
                break
        else:
            return False
    value = value.strip('"')
    if kind == "UUID":
        return bool(p.uuid) and value.lower() == p.uuid
    if kind == "LABEL":
        return bool(p.label) and value == p.label
    if kind == "PARTUUID":
        return bool(p.partuuid) and value.lower() == p.partuuid
    return False


def _mount_options(fstype: str) -> str:
    if fstype.startswith("ext"):
        return "ro,noload"
    if fstype == "xfs":
        return "ro,norecovery"
    return "ro"


def scan_image(image: Path, fmt: str, inp: ScanInput, workdir: Path | None = None) -> list[Finding]:
    """Scan every Linux filesystem in ``image`` (``raw``, ``vpc`` fixed VHD, or anything qemu-img reads:
    then a sparse raw copy is made first) and return the findings."""
    require("qemu-img", "unshare", "mount", "umount")
    if os.geteuid() != 0:
        raise BuildError("the offline scan mounts the image read-only through a loop device and needs root")
    with tempfile.TemporaryDirectory(dir=workdir, prefix="ik-scan-") as tmp:
        if fmt in ("raw", "vpc"):
            raw = image
            raw_size = image.stat().st_size - (512 if fmt == "vpc" else 0)
        else:
            raw = Path(tmp) / "disk.raw"
            run(["qemu-img", "convert", "-f", fmt, "-O", "raw", image, raw])  # sparse: only data is written
            raw_size = raw.stat().st_size
        partitions = find_partitions(raw, raw_size)
        if not partitions:
            raise BuildError(f"{image}: no Linux filesystem found to scan")
        job = {"image": str(raw), "mountpoint": str(Path(tmp) / "mnt"),
               "partitions": [p.__dict__ for p in partitions],
               "usernames": inp.usernames, "hostnames": inp.hostnames, "password": inp.password}
        res = run(["unshare", "--mount", "--propagation", "private", "--", sys.executable, "-m",
                   "imagekit.generalize.deprovision", "scan-worker"], input=json.dumps(job),
                  env={"PYTHONPATH": str(REPO_ROOT)}, timeout=1800)
    found = [Finding(**f) for f in json.loads(res.stdout)]
    return found


def check_image(image: Path, fmt: str, inp: ScanInput, timings: Timings | None = None) -> list[Finding]:
    """:func:`scan_image`, raising :class:`LeakFound` when anything is found; returns the (empty) findings."""
    with step("offline leak scan", timings):
        findings = scan_image(image, fmt, inp)
        if findings:
            raise LeakFound(image, findings)
    return findings


def _scan_worker() -> int:
    """Runs inside ``unshare --mount``: mount each partition read-only, put them together as the image's own
    /etc/fstab does (a separate /home or /var/log is scanned where it belongs), scan, unmount."""
    from imagekit.scan.rules import scan_tree

    job = json.loads(sys.stdin.read())
    inp = ScanInput(usernames=job["usernames"], hostnames=job["hostnames"], password=job["password"])
    mnt = Path(job["mountpoint"])
    partitions = [Partition(**p) for p in job["partitions"]]
    findings: list[Finding] = []
    mounted: list[Path] = []  # in mount order; unmounted in reverse
    try:
        dirs = []
        for i, p in enumerate(partitions):
            d = mnt / f"p{i}"
            d.mkdir(parents=True, exist_ok=True)
            opts = f"{_mount_options(p.fstype)},loop,offset={p.offset},sizelimit={p.size}"
            run(["mount", "-t", p.fstype, "-o", opts, job["image"], d])
            mounted.append(d)
            dirs.append(d)
            if p.fstype.startswith("ext"):
                dev = run(["findmnt", "-n", "-o", "SOURCE", d]).stdout.strip()
                header = run(["dumpe2fs", "-h", dev], check=False).stdout
                if "needs_recovery" in header or re.search(r"Filesystem state:\s+not clean", header):
                    findings.append(Finding("filesystem", "/", f"the filesystem at offset {p.offset} was not "
                                            "cleanly unmounted: the VM did not shut down cleanly"))
        root_index = next((i for i, d in enumerate(dirs)
                           if (d / "etc/fstab").is_file() and not (d / "etc/fstab").is_symlink()), None)
        alone = list(range(len(dirs)))
        if root_index is not None:
            root = dirs[root_index]
            alone.remove(root_index)
            fstab = (root / "etc/fstab").read_text(errors="replace")
            for source, mountpoint in fstab_mounts(fstab):
                target = root / mountpoint.lstrip("/")
                for i in list(alone):
                    # the target must be a real directory inside the image (resolve() would follow the
                    # image's absolute links out to the host)
                    if _matches(source, partitions[i]) and target.is_dir() and not target.is_symlink():
                        run(["mount", "--bind", dirs[i], target])
                        mounted.append(target)
                        alone.remove(i)
                        break
            findings += scan_tree(root, inp)
        # Partitions the image's fstab does not mount are scanned as trees of their own.
        for i in alone:
            findings += scan_tree(dirs[i], inp)
    finally:
        for d in reversed(mounted):
            run(["umount", d], check=False)
    json.dump([f.__dict__ for f in findings], sys.stdout)
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["scan-worker"]:
        raise SystemExit(_scan_worker())
    raise SystemExit("usage: python -m imagekit.generalize.deprovision scan-worker  (JSON job on stdin)")
