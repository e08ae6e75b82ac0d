"""Generalize a provisioned VM and prove each step did what it claims.

In the guest (:func:`deprovision`): the distro table's ``deprovision`` commands (``waagent -force
-deprovision+user``; for cloud-init images ``cloud-init clean`` first, as Azure's docs do), then imagekit's
own generalize steps for what those agents leave behind (the provisioned user's sudoers lines written by
cloud-init, root's shell history, the machine-id, and logs that name the user). Everything runs as **one**
root shell script: ``-deprovision+user`` deletes the very user we are logged in as, after which ``sudo``
no longer works for that session, so each step's verification has to happen inside the same root shell.
Every step reports its exit code and every claim it makes (user gone, /var/lib/waagent gone, cloud-init
instance state gone, host keys gone, machine-id empty, histories gone ...) is tested right after it.

The captured disk is then scanned offline, on the host, by :mod:`imagekit.scan`.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shlex
import time
from dataclasses import dataclass, field
from typing import Any

from imagekit.config.distros import Agent, Distro
from imagekit.core.errors import BuildError
from imagekit.core.log import Timings, step
from imagekit.vm.guest import Guest

log = logging.getLogger("imagekit.generalize.deprovision")

_USER_RE = r"^[a-z_][a-z0-9_-]*[$]?$"


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
        Step("remove persistent network rules",
             # cloud-init's ifupdown renderer pins eth0 to this VM's MAC in 70-persistent-net.rules at
             # provisioning; a VM made from the image has another MAC (Azure's SUSE guide: remove both files)
             "rm -f /etc/udev/rules.d/70-persistent-net.rules /etc/udev/rules.d/85-persistent-net-cloud-init.rules",
             "imagekit",
             (Claim("no persistent network rules in /etc/udev/rules.d",
                    _none_exist("/etc/udev/rules.d/70-persistent-net.rules "
                                "/etc/udev/rules.d/85-persistent-net-cloud-init.rules")),)),
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
