"""Provisioning: did the image's agent do what the OVF asked, and tell the fabric it is Ready?"""

from __future__ import annotations

import re
import shlex

from imagekit.checks.probes import WAAGENT_VERSION, file_text, key_id, read_file, sshd_config, version_tuple
from imagekit.checks.registry import ABSENT, CheckContext, CheckResult, Checks, Evidence, ProbeFailed, failed, passed
from imagekit.config.distros import Agent
from imagekit.config.profile import ProvisioningProfile
from imagekit.provision.resource_setup import WAAGENT_UNITS
from imagekit.vm.guest import CommandResult

OVF_COPY = "/var/lib/waagent/ovf-env.xml"
PROVISIONED_MARKER = "/var/lib/waagent/provisioned"
BOOT_FINISHED = "/var/lib/cloud/instance/boot-finished"
MARKER_CMD = (f"if [ -e {PROVISIONED_MARKER} ]; then ls -l {PROVISIONED_MARKER} && cat {PROVISIONED_MARKER}; "
              f"else echo '{ABSENT}' {PROVISIONED_MARKER}; fi")
# cloud-init status exits 1 (error) or 2 (degraded) with its status printed: a finding, judged on the text.
CLOUD_INIT_STATUS = (f"cloud-init status --long; if [ -e {BOOT_FINISHED} ]; then ls -l {BOOT_FINISHED}; "
                     f"else echo '{ABSENT}' {BOOT_FINISHED}; fi")

CHECKS = Checks()


@CHECKS.add(
    "provisioning.user",
    title="OVF user exists with its SSH key",
    verifies="The user named in the OVF exists and its authorized_keys holds every public key the OVF "
    "gave, because that key is how the VM's owner logs in.",
    source="ovf-env.xml UserName and SSH/PublicKeys (waagent provisioning; cloud-init Azure datasource)",
)
def user(ctx: CheckContext) -> CheckResult:
    name = ctx.profile.username
    pw = ctx.probe(f"getent passwd {shlex.quote(name)}", ok=(0, 2))  # 2: no such user
    if pw.returncode == 2:
        return failed(f"user {name} does not exist", pw)
    fields = pw.stdout.strip().split(":")
    if len(fields) < 7:
        raise ctx.probe_failed("getent printed no passwd entry", pw)
    home = fields[5]
    text, keys = file_text(ctx, f"{home}/.ssh/authorized_keys")
    have = {key_id(line) for line in (text or "").splitlines()} - {None}
    missing = [k.split()[-1] if len(k.split()) > 2 else k[:40] for k in ctx.profile.ssh_public_keys
               if key_id(k) not in have]
    if missing:
        return failed(f"{len(missing)} of {len(ctx.profile.ssh_public_keys)} OVF key(s) missing from "
                      f"{home}/.ssh/authorized_keys", pw, keys)
    return passed(f"user {name} exists; all {len(ctx.profile.ssh_public_keys)} OVF key(s) authorized", pw, keys)


@CHECKS.add(
    "provisioning.password-auth",
    title="SSH password login as the OVF says",
    verifies="sshd's effective PasswordAuthentication is 'no' when the OVF sets "
    "DisableSshPasswordAuthentication and 'yes' otherwise, so password logins are open only when asked.",
    source="ovf-env.xml DisableSshPasswordAuthentication; waagent/cloud-init ssh_pwauth",
)
def password_auth(ctx: CheckContext) -> CheckResult:
    cfg, res = sshd_config(ctx)
    want = "no" if ctx.profile.disable_password_auth else "yes"
    got = cfg.get("passwordauthentication")
    line = f"(from sshd -T) passwordauthentication {got}"
    if got is None:
        return failed("sshd -T did not report passwordauthentication", res)
    if got != want:
        return failed(f"PasswordAuthentication is {got}; the OVF asks for {want} "
                      f"(DisableSshPasswordAuthentication={str(ctx.profile.disable_password_auth).lower()})", line)
    return passed(f"PasswordAuthentication {got}, as the OVF asks", line)


@CHECKS.add(
    "provisioning.hostname",
    title="Hostname set and resolvable",
    verifies="The guest's hostname is the OVF's HostName and resolves, because tools such as sudo and "
    "clustered software look their own name up.",
    source="ovf-env.xml HostName; LISA verify_dns_name_resolution",
)
def hostname(ctx: CheckContext) -> CheckResult:
    want = ctx.profile.hostname
    hn = ctx.probe("hostname")
    res = ctx.probe(f"getent hosts {shlex.quote(want)} || getent ahosts {shlex.quote(want)}", ok=(0, 2))
    got = hn.stdout.strip()
    if got != want:
        return failed(f"hostname is {got!r}, the OVF says {want!r}", hn, res)
    if res.returncode == 2:  # getent: no such entry
        return failed(f"hostname {want} does not resolve", hn, res)
    return passed(f"hostname {want} set and resolves to {res.stdout.split()[0]}", hn, res)


@CHECKS.add(
    "provisioning.sudo",
    title="Sudo rules for the OVF user",
    verifies="The OVF user may run any command as root, without a password when the OVF gave none "
    "(otherwise the user could never use sudo).",
    source="waagent /etc/sudoers.d/waagent; cloud-init default user sudo rule",
)
def sudo(ctx: CheckContext) -> CheckResult:
    name = ctx.profile.username
    res = ctx.probe(f"sudo -l -U {shlex.quote(name)}", ok=(0, 1))
    if res.returncode == 1 and "not allowed to run sudo" not in res.stdout + res.stderr:
        raise ctx.probe_failed("sudo -l failed without saying the user may not run sudo", res)
    rules = [ln.strip() for ln in res.stdout.splitlines() if ln.strip().startswith("(")]
    all_rules = [r for r in rules if re.match(r"^\(ALL(\s*:\s*ALL)?\)\s+(NOPASSWD:\s*)?ALL$", r)]
    nopw = [r for r in all_rules if "NOPASSWD" in r]
    if not all_rules:
        return failed(f"{name} may not run ALL commands as root", res)
    if ctx.profile.password is None and not nopw:
        return failed(f"the OVF gave no password but {name}'s sudo rule asks for one", res)
    return passed(f"{name}: {(nopw or all_rules)[0]}", res)


@CHECKS.add(
    "provisioning.marker",
    title="Agent's provisioned marker",
    verifies="The agent wrote its 'provisioned' state (waagent's /var/lib/waagent/provisioned; cloud-init's "
    "boot-finished and status done), so it will not provision again on the next boot.",
    source="waagent ProvisionHandler (provisioned file); cloud-init instance state",
)
def marker(ctx: CheckContext) -> CheckResult:
    wa = ctx.probe(MARKER_CMD)
    wa_present = not wa.stdout.startswith(ABSENT)
    if ctx.distro.agent is Agent.WAAGENT:
        if not wa_present:
            return failed(f"{PROVISIONED_MARKER} is missing", wa)
        return passed(f"{PROVISIONED_MARKER} present", wa)
    ci = ctx.probe(CLOUD_INIT_STATUS)
    if not re.search(r"^status:", ci.stdout, re.M):
        raise ctx.probe_failed("cloud-init status printed no status line", ci)
    problems = []
    if not re.search(r"^status:\s*done", ci.stdout, re.M):
        problems.append("cloud-init status is not 'done'")
    if f"{ABSENT} {BOOT_FINISHED}" in ci.stdout:
        problems.append(f"{BOOT_FINISHED} is missing")
    if problems:
        return failed("; ".join(problems), ci, wa)
    extra = "" if wa_present else f" ({PROVISIONED_MARKER} not written by waagent)"
    return passed("cloud-init finished (status done, boot-finished)" + extra, ci, wa)


def redact_ovf(text: str, profile: ProvisioningProfile) -> str:
    """The OVF copy as safe evidence: CustomData and any password value never shown."""
    text = re.sub(r"(<(?:\w+:)?CustomData>)(.*?)(</(?:\w+:)?CustomData>)",
                  lambda m: f"{m.group(1)}«custom data, {len(m.group(2))} characters, not shown»{m.group(3)}",
                  text, flags=re.S)

    def pw(m: re.Match[str]) -> str:
        v = m.group(2)
        shown = v if v in ("*", "REDACTED", "") else "«value not shown»"
        return f"{m.group(1)}{shown}{m.group(3)}"

    text = re.sub(r"(<(?:\w+:)?UserPassword>)(.*?)(</(?:\w+:)?UserPassword>)", pw, text, flags=re.S)
    if profile.password:
        text = text.replace(profile.password, "«the OVF password»")
    return text


@CHECKS.add(
    "provisioning.ovf-redacted",
    title="OVF copy on disk has the password redacted",
    verifies="The copy of ovf-env.xml the agents leave in /var/lib/waagent holds no clear-text password, "
    "because that file outlives provisioning and is readable by root tools and backups.",
    source="waagent copy_ovf_env (PASSWORD_REPLACEMENT); cloud-init Azure datasource (REDACTED)",
)
def ovf_redacted(ctx: CheckContext) -> CheckResult:
    try:  # not cached: it must never sit in a shared cache unredacted
        res = ctx.probe(read_file(OVF_COPY), marker=True, cache=False)
    except ProbeFailed as exc:  # its evidence shows the output: redact it too
        r = exc.result
        raise ProbeFailed(exc.reason, exc.command, r and CommandResult(
            r.command, r.returncode, redact_ovf(r.stdout, ctx.profile), redact_ovf(r.stderr, ctx.profile))) from None
    safe = CommandResult(res.command, res.returncode, redact_ovf(res.stdout, ctx.profile), res.stderr)
    if res.stdout.startswith(ABSENT):
        return failed(f"{OVF_COPY} is missing", safe)
    if not res.stdout.strip():
        raise ctx.probe_failed(f"{OVF_COPY} is empty", safe)
    values = re.findall(r"<(?:\w+:)?UserPassword>(.*?)</(?:\w+:)?UserPassword>", res.stdout, re.S)
    if ctx.profile.password and ctx.profile.password in res.stdout:
        return failed(f"{OVF_COPY} contains the OVF password in clear text", safe)
    leaked = [v for v in values if v not in ("*", "REDACTED", "")]
    if leaked:
        return failed(f"{OVF_COPY} has a UserPassword value that is not redacted", safe)
    what = f"UserPassword redacted as {values[0]!r}" if values else "no UserPassword element"
    return passed(f"{OVF_COPY}: {what}", safe)


@CHECKS.add(
    "provisioning.ready-reported",
    title="Ready reported to the fabric",
    verifies="The agent reported the role instance Ready to the WireServer (the emulator recorded it), "
    "because Azure fails a deployment whose VM never reports Ready (provisioning timeout).",
    source="WireServer POST /machine?comp=health (waagent report_ready; cloud-init _report_ready)",
)
def ready_reported(ctx: CheckContext) -> CheckResult:
    reports = list(ctx.fabric.health_reports)
    lines = [f"{i + 1}. {r.state}" + (f" {r.substatus}" if r.substatus else "")
             + (f": {r.description}" if r.description else "")
             + (f" (at {r.seconds:.1f} s)" if r.seconds is not None else "") for i, r in enumerate(reports)]
    ev = "health reports recorded by the fabric emulator:\n" + ("\n".join(lines) or "(none)")
    if not reports:
        return failed("no health report reached the fabric emulator", ev)
    ready = [r for r in reports if r.state == "Ready"]
    if not ready:
        last = reports[-1]
        return failed(f"never reported Ready; last: {last.state} {last.substatus} {last.description}".strip(), ev)
    return passed(f"Ready reported ({len(reports)} health report(s))", ev)


@CHECKS.add(
    "provisioning.agent-running",
    title="Azure agent running, and its version",
    verifies="The Azure Linux agent service is active (it reports health and runs extensions after "
    "provisioning), and reports its version.",
    source="create-upload-generic.md (waagent enabled); LISA smoke tests",
)
def agent_running(ctx: CheckContext) -> CheckResult:
    show = ctx.probe("systemctl show -p Id -p LoadState -p ActiveState -p SubState " + " ".join(WAAGENT_UNITS))
    if "LoadState=" not in show.stdout:
        raise ctx.probe_failed("systemctl show printed no unit state", show)
    ver = ctx.probe(WAAGENT_VERSION, ok=(0, 127))  # 127: waagent not installed (judged below)
    evidence: list[Evidence] = [show, ver]
    units = [dict(ln.split("=", 1) for ln in block.splitlines() if "=" in ln) for block in show.stdout.split("\n\n")]
    loaded = [u for u in units if u.get("LoadState") == "loaded"]
    m = re.search(r"WALinuxAgent-?\s*-?\s*(\d+(?:\.\d+)+)", ver.stdout)
    version = m.group(1) if m else "unknown"
    ctx.facts.setdefault("agent_version", version)
    if not loaded:
        return failed("no waagent unit is installed", *evidence)
    active = [u for u in loaded if u.get("ActiveState") == "active"]
    if not active:
        return failed(f"{loaded[0].get('Id')} is {loaded[0].get('ActiveState')}/{loaded[0].get('SubState')}",
                      *evidence)
    if ctx.distro.agent is Agent.CLOUD_INIT:
        ci = ctx.probe("cloud-init --version")
        evidence.append(ci)
        return passed(f"{active[0].get('Id')} active, waagent {version}; {ci.stdout.strip() or ci.stderr.strip()}",
                      *evidence)
    if version_tuple(version) == ():
        return failed(f"{active[0].get('Id')} active but waagent --version gave no version", *evidence)
    return passed(f"{active[0].get('Id')} active, waagent {version}", *evidence)
