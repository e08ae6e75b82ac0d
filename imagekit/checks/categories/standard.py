"""Azure's image standard: the certification and LISA AzureImageStandard rules checkable inside the guest.

Sources are in ../shared/research/image-standards.md: (A) the certification test tool's Linux cases,
(B) the LISA LinuxQualityValidations set, (C) the generic prerequisites of create-upload-generic.md.
"""

from __future__ import annotations

import json
import re
import shlex

from imagekit.checks.probes import (
    CMDLINE,
    WAAGENT_VERSION,
    conf_lines,
    key_id,
    os_disk,
    sshd_config,
    topology,
    version_tuple,
    waagent_conf,
)
from imagekit.checks.registry import ABSENT, PROBE_OK, CheckContext, CheckResult, Checks, Evidence, failed, passed
from imagekit.config.distros import Agent, Family
from imagekit.provision.resource_setup import SHIM_MARK, WAAGENT_UNITS

# Families whose initramfs is initramfs-tools: its init runs `sleep $ROOTDELAY` unconditionally, so
# rootdelay=300 costs five minutes at every boot (azure-platform.md §8). dracut waits *up to* rootdelay.
INITRAMFS_TOOLS_FAMILIES = frozenset({Family.DEBIAN, Family.UBUNTU})
MIN_WAAGENT = (2, 2, 41)
HV_MODULES = ("hv_vmbus", "hv_storvsc", "hv_netvsc")
# Lines in waagent.log that running under QEMU produces before the resource-disk shim is in place: the
# agent's VMBus lookup finds no disk. They say nothing about the image and are reported, not counted.
QEMU_ONLY_WAAGENT_ERRORS = ("unable to detect disk topology",)
# cloud-init ≥ 23 reports this when the DHCP lease has no option 121/245 routes to the WireServer or IMDS,
# which QEMU's user-mode DHCP cannot send (azure-platform.md §3, §4); on Azure the lease carries them.
QEMU_ONLY_CLOUD_INIT_ERRORS = ("failure to find primary DHCP interface",)

# Probes that read other users' files must run as root, or unreadable homes would look empty.
AS_ROOT = ("[ \"$(id -u)\" -eq 0 ] || { echo 'imagekit probe: not running as root, so /etc/shadow and "
           "home directories cannot be read' >&2; exit 1; }; ")
HISTORY = (
    AS_ROOT + "homes=$(awk -F: '$3>=1000 && $3<65534 {print $6}' /etc/passwd) || exit 1; "
    "for d in /root $homes; do for f in \"$d\"/.*history; do "
    "if [ -f \"$f\" ]; then stat -c '%n %s' \"$f\" || exit 1; fi; done; done; "
    f"echo {PROBE_OK}"
)
ACCOUNTS = (
    AS_ROOT + "awk -F: '$3>=1000 && $3<65534 {print \"user \" $1 \" uid=\" $3 \" home=\" $6}' /etc/passwd "
    "|| exit 1; "
    "awk -F: '{s=$2; if (s == \"\") print \"empty-password \" $1; "
    "else if (s ~ /^\\$/ || (length(s) >= 13 && s !~ /^[!*]/)) print \"password \" $1}' /etc/shadow || exit 1; "
    "pw=$(getent passwd) || exit 1; "
    "printf '%s\\n' \"$pw\" | awk -F: '{print $1 \" \" $6}' | while read -r u h; do "
    "for f in \"$h/.ssh/authorized_keys\" \"$h/.ssh/authorized_keys2\"; do "
    "if [ -s \"$f\" ]; then n=$(grep -c . \"$f\"); [ $? -le 1 ] || exit 1; echo \"keys $u $f $n\"; fi; "
    "done; done || exit 1; "
    f"echo {PROBE_OK}"
)
MODULES = (
    "for m in udf vfat; do out=$(modprobe -n -v $m 2>&1); echo \"$m exit=$? ${out:-(loaded or built in)}\"; "
    "done; cfg=$(modprobe --showconfig) || exit 1; "
    "printf '%s\\n' \"$cfg\" | grep -E '^(blacklist|install) (udf|vfat)( |$)'; "
    f"echo {PROBE_OK}"
)
INITRAMFS_HV = (
    "k=$(uname -r) || exit 1; img=''; for f in /boot/initrd.img-$k /boot/initramfs-$k.img; do "
    "if [ -f \"$f\" ]; then img=$f; fi; done; echo \"initramfs: ${img:-none found for $k}\"; "
    "if [ -n \"$img\" ]; then "
    "if command -v lsinitramfs >/dev/null; then list=$(lsinitramfs \"$img\") || exit 1; "
    "elif command -v lsinitrd >/dev/null; then list=$(lsinitrd \"$img\") || exit 1; "
    "else echo 'imagekit probe: neither lsinitramfs nor lsinitrd is installed' >&2; exit 1; fi; "
    "printf '%s\\n' \"$list\" | grep -oE 'hv_(vmbus|storvsc|netvsc)\\.ko[.a-z]*' | sort -u; fi; "
    "b=/lib/modules/$k/modules.builtin; if [ -f \"$b\" ]; then "
    "grep -oE 'hv_(vmbus|storvsc|netvsc)\\.ko' \"$b\" | sed 's/$/ (built in)/'; fi; "
    f"echo {PROBE_OK}"
)
SERVICE_UNITS = ("ssh.service", "sshd.service", "walinuxagent.service", "waagent.service",
                 "cloud-init-local.service", "cloud-init.service", "cloud-init-network.service")
SERVICES = (
    "command -v systemctl >/dev/null || { echo 'imagekit probe: systemctl not found' >&2; exit 1; }; "
    f"for u in {' '.join(SERVICE_UNITS)}; do "
    "s=$(systemctl is-enabled $u 2>/dev/null); echo \"$u ${s:-not-found}\"; done"
)
SERIAL = ("systemctl is-active serial-getty@ttyS0.service; systemctl is-enabled serial-getty@ttyS0.service "
          "2>&1 | head -n 1")
# systemd's ActiveState values: anything else on the first line means systemctl itself did not answer.
ACTIVE_STATES = ("active", "inactive", "failed", "activating", "deactivating", "reloading", "maintenance",
                 "refreshing")
ARCH = "uname -m && getconf LONG_BIT"
OPENSSL = f"if command -v openssl >/dev/null; then openssl version; else echo '{ABSENT}' openssl; fi"
PYTHON = ("if command -v python3 >/dev/null; then python3 --version; "
          "elif command -v python >/dev/null; then python --version 2>&1; "
          f"else echo '{ABSENT}' python; fi")

CHECKS = Checks()


def _log_grep(path: str, pattern: str, extra: str = "") -> str:
    """Shell: the matching lines of a log with numbers (nothing when none match), ``extra``, ``ls -l``;
    an :data:`ABSENT` line when the log does not exist; a grep that failed (not "no match") fails it."""
    return (f"f={path}; if [ ! -e $f ]; then echo '{ABSENT}' $f; else "
            f"grep -nE '{pattern}' $f; [ $? -le 1 ] || exit 1; {extra}ls -l $f || exit 1; fi; echo {PROBE_OK}")


WAAGENT_LOG = _log_grep("/var/log/waagent.log", " ERROR |Traceback|CRITICAL",
                        f"grep -n '{SHIM_MARK}' $f | head -n 1; ")
CLOUD_INIT_LOG = _log_grep("/var/log/cloud-init.log",
                           "\\[(ERROR|CRITICAL)\\]|Traceback|\\[WARNING\\].*([Ff]ail|[Ee]rror)")


def _cmdline_args(ctx: CheckContext) -> tuple[list[str], Evidence]:
    res = ctx.probe(CMDLINE)
    return res.stdout.split(), res


@CHECKS.add(
    "standard.cmdline-console",
    title="Kernel console on ttyS0",
    verifies="The kernel command line has console=ttyS0, so boot messages reach Azure's serial console "
    "and boot diagnostics.",
    source="Azure certification: kernel parameter console=ttyS0; create-upload-generic.md GRUB_CMDLINE_LINUX",
)
def cmdline_console(ctx: CheckContext) -> CheckResult:
    args, res = _cmdline_args(ctx)
    hits = [a for a in args if re.match(r"^console=ttyS0(,.*)?$", a)]
    if not hits:
        return failed("console=ttyS0 is missing from the kernel command line", res)
    consoles = [a for a in args if a.startswith("console=")]
    if consoles[-1] not in hits:
        return failed(f"console=ttyS0 is present but {consoles[-1]} comes last, so /dev/console is not the "
                      "serial port", res)
    return passed(f"{hits[-1]} on the kernel command line", res)


@CHECKS.add(
    "standard.cmdline-earlyprintk",
    title="earlyprintk on ttyS0",
    verifies="The kernel command line has earlyprintk=ttyS0, so a kernel that dies before the console is "
    "up still leaves its messages in boot diagnostics.",
    source="Azure certification: kernel parameter earlyprintk=ttyS0",
)
def cmdline_earlyprintk(ctx: CheckContext) -> CheckResult:
    args, res = _cmdline_args(ctx)
    hits = [a for a in args if re.match(r"^earlyprintk=(serial,)?ttyS0(,.*)?$", a)]
    if not hits:
        return failed("earlyprintk=ttyS0 is missing from the kernel command line", res)
    return passed(f"{hits[0]} on the kernel command line", res)


@CHECKS.add(
    "standard.cmdline-rootdelay",
    title="rootdelay as the family's initramfs needs",
    verifies="Where the initramfs treats rootdelay as an upper bound (dracut families), rootdelay=300 is "
    "set as Azure asks; where initramfs-tools sleeps for the whole value (Debian, Ubuntu), no rootdelay is "
    "set, because it would stall every boot.",
    source="Azure certification: rootdelay=300; initramfs-tools init `sleep $ROOTDELAY` (azure-platform.md §8)",
)
def cmdline_rootdelay(ctx: CheckContext) -> CheckResult:
    args, res = _cmdline_args(ctx)
    delays = [a for a in args if a.startswith("rootdelay=")]
    if ctx.distro.family in INITRAMFS_TOOLS_FAMILIES:
        if delays:
            return failed(f"{delays[-1]} on a {ctx.distro.family.value} image: initramfs-tools sleeps that long "
                          "at every boot", res)
        return passed(f"no rootdelay ({ctx.distro.family.value}: initramfs-tools would sleep for it)", res)
    if not delays:
        return failed("rootdelay=300 is missing (this family's initramfs waits at most that long)", res)
    value = delays[-1].split("=", 1)[1]
    if not value.isdigit() or int(value) < 300:
        return failed(f"{delays[-1]}: Azure asks for rootdelay=300", res)
    return passed(f"{delays[-1]} (an upper bound for this family's initramfs)", res)


@CHECKS.add(
    "standard.client-alive-interval",
    title="sshd ClientAliveInterval 30–235",
    verifies="sshd's effective ClientAliveInterval is between 30 and 235 seconds (180 recommended), so "
    "idle SSH sessions survive Azure's load balancer idle timeout.",
    source="Azure certification: ClientAliveInterval 180 (30–235); LISA verify_client_active_interval",
)
def client_alive_interval(ctx: CheckContext) -> CheckResult:
    cfg, res = sshd_config(ctx)
    raw = cfg.get("clientaliveinterval")
    line = f"(from {res.command}) clientaliveinterval {raw}"
    if raw is None:
        return failed("sshd -T did not report clientaliveinterval", res)
    if not raw.isdigit() or not 30 <= int(raw) <= 235:
        return failed(f"ClientAliveInterval is {raw} (0 means unset); allowed 30–235, recommended 180", line,
                      ctx.run("grep -rniE '^\\s*ClientAliveInterval' /etc/ssh/sshd_config /etc/ssh/sshd_config.d "
                              "|| echo '(no ClientAliveInterval line in sshd_config)'"))
    return passed(f"ClientAliveInterval {raw}", line)


@CHECKS.add(
    "standard.shell-history",
    title="Shell history empty",
    verifies="No shell history file of root or any user holds commands, because a published image must "
    "not leak what was typed while building it.",
    source="Azure certification: bash history cleared; LISA verify_bash_history_is_empty",
)
def shell_history(ctx: CheckContext) -> CheckResult:
    res = ctx.probe(HISTORY, marker=True)
    files: dict[str, int] = {}
    for ln in res.stdout.splitlines():
        name, _, size = ln.rpartition(" ")
        if not name or not size.isdigit():
            raise ctx.probe_failed(f"unexpected line in the history listing: {ln[:200]!r}", res)
        files[name] = int(size)
    full = [name for name, size in files.items() if size > 0]
    if full:
        return failed(f"{len(full)} non-empty history file(s): " + ", ".join(full), res)
    return passed(f"no non-empty shell history files ({len(files)} empty)" if files
                  else "no shell history files", res)


@CHECKS.add(
    "standard.no-preexisting-users",
    title="No pre-existing users, passwords or keys",
    verifies="Besides the user provisioning created, no regular user exists and no account has a password "
    "or SSH authorized keys, because an image must not ship default credentials.",
    source="Azure certification: no default credentials; LISA verify_no_pre_exist_users",
)
def no_preexisting_users(ctx: CheckContext) -> CheckResult:
    res = ctx.probe(ACCOUNTS, marker=True)
    me = ctx.profile.username
    problems: list[str] = []
    notes: list[str] = []
    evidence: list[Evidence] = [res]
    for ln in res.stdout.splitlines():
        f = ln.split()
        if len(f) < 2 or f[1] == me:
            continue
        if f[0] == "user":
            problems.append(f"user {f[1]} ({f[2]})")
        elif f[0] == "password":
            problems.append(f"{f[1]} has a password")
        elif f[0] == "empty-password":
            problems.append(f"{f[1]} has an empty password")
        elif f[0] == "keys":
            keys = ctx.probe(f"cat -- {shlex.quote(f[2])}")
            evidence.append(keys)
            if _refused_copies_of_ovf_keys(keys.stdout, ctx.profile.ssh_public_keys):
                notes.append(f"{f[2]} holds only the OVF's keys with a forced command refusing login "
                             "(cloud-init disable_root)")
            else:
                problems.append(f"{f[1]} has SSH keys in {f[2]}")
    note = f" ({'; '.join(notes)})" if notes else ""
    if problems:
        return failed("left behind: " + "; ".join(problems) + note, *evidence)
    return passed(f"only {me} (provisioned) has a login{note}", *evidence)


def _refused_copies_of_ovf_keys(text: str, ovf_keys: tuple[str, ...]) -> bool:
    """True if every key line is one of the OVF's keys behind a ``command=`` option (a login refusal)."""
    wanted = {key_id(k) for k in ovf_keys}
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return bool(lines) and all(
        "command=" in ln.split(" ssh-")[0] and key_id(ln) in wanted for ln in lines
    )


@CHECKS.add(
    "standard.waagent-version",
    title="Azure Linux agent ≥ 2.2.41",
    verifies="The installed Azure Linux agent is at least 2.2.41, the oldest version Azure certifies.",
    source="Azure certification: Linux Agent ≥ 2.2.41; LISA verify_waagent_version",
)
def waagent_version(ctx: CheckContext) -> CheckResult:
    res = ctx.probe(WAAGENT_VERSION, ok=(0, 127))
    if res.returncode == 127:
        return failed("waagent is not installed", res)
    m = re.search(r"WALinuxAgent\s*-\s*(\d+(?:\.\d+)+)", res.stdout)
    if not m:
        return failed("waagent --version printed no version", res)
    v = m.group(1)
    if version_tuple(v) < MIN_WAAGENT:
        return failed(f"waagent {v} is older than 2.2.41", res)
    return passed(f"waagent {v}", res)


@CHECKS.add(
    "standard.agent-autoupdate",
    title="Agent auto-update enabled",
    verifies="waagent.conf leaves AutoUpdate.Enabled on, so the agent's extension handler keeps itself "
    "current as Azure expects.",
    source="Azure certification: agent auto update enabled; waagent.conf AutoUpdate.Enabled",
)
def agent_autoupdate(ctx: CheckContext) -> CheckResult:
    conf, res = waagent_conf(ctx)
    if conf is None:
        return failed("/etc/waagent.conf is missing", res)
    value = conf.get("AutoUpdate.Enabled")
    ev = conf_lines(res, ("AutoUpdate.",))
    if value is None:
        return passed("AutoUpdate.Enabled not set (waagent's default is y)", ev)
    if not value.lower().startswith("y"):
        return failed(f"AutoUpdate.Enabled={value}", ev)
    return passed(f"AutoUpdate.Enabled={value}", ev)


@CHECKS.add(
    "standard.64bit",
    title="64-bit OS",
    verifies="The kernel and userland are 64-bit, as Azure supports only 64-bit Linux images.",
    source="Azure certification: 64-bit OS; LISA verify_azure_64bit_os",
)
def sixty_four_bit(ctx: CheckContext) -> CheckResult:
    res = ctx.probe(ARCH)
    lines = res.stdout.split()
    if len(lines) < 2:
        raise ctx.probe_failed("expected the machine and LONG_BIT on two lines", res)
    if lines[0] not in ("x86_64", "aarch64") or lines[1] != "64":
        return failed(f"not a 64-bit system: {' '.join(lines) or 'no output'}", res)
    return passed(f"{lines[0]}, LONG_BIT {lines[1]}", res)


def _tool_version(ctx: CheckContext, command: str, pattern: str, minimum: tuple[int, ...], what: str) -> CheckResult:
    res = ctx.probe(command)
    if res.stdout.startswith(ABSENT):
        return failed(f"{what} is not installed", res)
    m = re.search(pattern, res.stdout + res.stderr)
    if not m:
        raise ctx.probe_failed(f"printed no {what} version", res)
    if version_tuple(m.group(1)) < minimum:
        return failed(f"{what} {m.group(1)} is older than {'.'.join(map(str, minimum))}", res)
    return passed(f"{what} {m.group(1)}", res)


@CHECKS.add(
    "standard.openssl",
    title="OpenSSL present",
    verifies="OpenSSL ≥ 0.9.8 is installed, which the agents use for certificates and the wire protocol.",
    source="Azure certification: OpenSSL ≥ 0.9.8; LISA verify_openssl_version",
)
def openssl(ctx: CheckContext) -> CheckResult:
    return _tool_version(ctx, OPENSSL, r"OpenSSL\s+(\d+\.\d+\.\d+)", (0, 9, 8), "OpenSSL")


@CHECKS.add(
    "standard.python",
    title="Python present",
    verifies="Python ≥ 2.6 is installed, which the Azure Linux agent runs on.",
    source="Azure certification: Python ≥ 2.6; LISA verify_python_version",
)
def python(ctx: CheckContext) -> CheckResult:
    return _tool_version(ctx, PYTHON, r"Python\s+(\d+\.\d+(?:\.\d+)?)",
                         (2, 6), "Python")


# Partition types that may sit beside the root partition: BIOS boot and the EFI system partition.
_BOOT_TYPES = {"21686148-6248-6449-6E6F-744E656564454649", "C12A7328-F81F-11D2-BA4B-00A0C93EC93B", "ef", "ef02"}


@CHECKS.add(
    "standard.root-partition",
    title="Single root partition at 1 MiB",
    verifies="The OS disk holds one root partition (beside only boot partitions), not LVM, and its first "
    "partition starts at 1 MiB, as Azure's image validation requires.",
    source="Azure certification: single root partition; first partition starts at 1 MB (sector 2048)",
)
def root_partition(ctx: CheckContext) -> CheckResult:
    osd, os_ev = os_disk(ctx)
    if osd is None:
        return failed("could not tell which disk holds the root filesystem (LVM or unknown layout?)", *os_ev)
    res = ctx.probe(f"sfdisk -J {shlex.quote(osd)}")
    evidence: list[Evidence] = [res, *os_ev]
    try:
        table = json.loads(res.stdout)["partitiontable"]
    except (ValueError, KeyError, TypeError):
        raise ctx.probe_failed(f"sfdisk printed no partition table of {osd} (JSON)", res) from None
    sector = int(table.get("sectorsize", 512))
    parts = sorted(table.get("partitions", []), key=lambda p: int(p["start"]))
    if not parts:
        return failed(f"{osd} has no partitions (root on the whole disk)", *evidence)
    devs, _ = topology(ctx)
    root_src = os_ev[0].stdout.split()[0] if os_ev[0].stdout.split() else ""
    problems = []
    first = int(parts[0]["start"]) * sector
    if first != 1024 * 1024:
        problems.append(f"first partition starts at byte {first} (sector {parts[0]['start']}), not 1 MiB")
    if not any(p["node"] == root_src for p in parts):
        problems.append(f"root {root_src} is not a partition of {osd}")
    for p in parts:
        if p["node"] == root_src:
            continue
        mp = devs[p["node"]].mountpoint if p["node"] in devs else ""
        if str(p.get("type", "")).upper() in {t.upper() for t in _BOOT_TYPES} or mp in ("/boot", "/boot/efi"):
            continue
        problems.append(f"extra partition {p['node']} (type {p.get('type')}{', mounted at ' + mp if mp else ''})")
    if problems:
        return failed("; ".join(problems), *evidence)
    return passed(f"root {root_src} on {osd}; first partition at 1 MiB; {len(parts)} partition(s)", *evidence)


@CHECKS.add(
    "standard.udf-vfat",
    title="udf and vfat available",
    verifies="The udf and vfat filesystems can be loaded (not missing, blacklisted or disabled), because "
    "Azure delivers the provisioning media as UDF and the agents must mount it.",
    source="create-upload-generic.md: udf and vfat modules enabled",
)
def udf_vfat(ctx: CheckContext) -> CheckResult:
    res = ctx.probe(MODULES, marker=True)
    seen = {f[0] for f in map(str.split, res.stdout.splitlines()) if len(f) >= 2 and f[1].startswith("exit=")}
    if seen != {"udf", "vfat"}:
        raise ctx.probe_failed("expected one 'exit=' line each for udf and vfat", res)
    problems = []
    for ln in res.stdout.splitlines():
        f = ln.split()
        if len(f) >= 2 and f[0] in ("udf", "vfat") and f[1].startswith("exit="):
            if f[1] != "exit=0":
                problems.append(f"{f[0]} is not available")
            elif re.search(r"install\s+/(usr/)?bin/(true|false)", ln):
                problems.append(f"{f[0]} is disabled (install /bin/true)")
        elif f and f[0] in ("blacklist", "install") and len(f) >= 2:
            problems.append(f"{f[1]} is {'blacklisted' if f[0] == 'blacklist' else 'overridden: ' + ln}")
    if problems:
        return failed("; ".join(dict.fromkeys(problems)), res)
    return passed("udf and vfat loadable", res)


@CHECKS.add(
    "standard.hv-initramfs",
    title="Hyper-V drivers in the initramfs",
    verifies="hv_vmbus, hv_storvsc and hv_netvsc are in the initramfs (or built in), because without them "
    "the kernel cannot find its root disk or network on Azure.",
    source="create-upload-generic.md: hv_vmbus, hv_netvsc and hv_storvsc in the initramfs",
)
def hv_initramfs(ctx: CheckContext) -> CheckResult:
    res = ctx.probe(INITRAMFS_HV, marker=True)
    missing = [m for m in HV_MODULES if f"{m}.ko" not in res.stdout]
    if "initramfs: none found" in res.stdout:
        return failed("no initramfs found for the running kernel", res)
    if missing:
        return failed(f"missing from the initramfs: {', '.join(missing)}", res)
    return passed("hv_vmbus, hv_storvsc and hv_netvsc present", res)


@CHECKS.add(
    "standard.waagent-log",
    title="No errors in waagent.log",
    verifies="waagent.log has no ERROR lines or tracebacks, which show a part of the agent failing.",
    source="LISA AzureImageStandard (boot and agent log errors)",
)
def waagent_log(ctx: CheckContext) -> CheckResult:
    res = ctx.probe(WAAGENT_LOG, marker=True)
    if res.stdout.startswith(ABSENT):
        return failed("/var/log/waagent.log does not exist", res)
    shim_line = next((int(ln.split(":", 1)[0]) for ln in res.stdout.splitlines() if SHIM_MARK in ln), None)
    errors: list[str] = []
    excused: list[str] = []
    for ln in res.stdout.splitlines():
        if SHIM_MARK in ln or not re.match(r"^\d+:", ln):
            continue
        n = int(ln.split(":", 1)[0])
        qemu_only = any(s in ln for s in QEMU_ONLY_WAAGENT_ERRORS) and shim_line is not None and n < shim_line
        (excused if qemu_only else errors).append(ln)
    note = (f"; {len(excused)} line(s) excused: the VMBus resource-disk lookup failing under QEMU before the "
            "test shim was installed" if excused else "")
    if errors:
        return failed(f"{len(errors)} error line(s) in waagent.log{note}", res)
    return passed(f"no errors in waagent.log{note}", res)


@CHECKS.add(
    "standard.cloud-init-log",
    title="No errors in cloud-init.log",
    verifies="cloud-init.log has no ERROR/CRITICAL lines, failed modules or tracebacks, which show part "
    "of provisioning silently not happening.",
    source="LISA AzureImageStandard (cloud-init errors)",
    agents=[Agent.CLOUD_INIT],
)
def cloud_init_log(ctx: CheckContext) -> CheckResult:
    res = ctx.probe(CLOUD_INIT_LOG, marker=True)
    if res.stdout.startswith(ABSENT):
        return failed("/var/log/cloud-init.log does not exist", res)
    lines = [ln for ln in res.stdout.splitlines() if re.match(r"^\d+:", ln)]
    excused = [ln for ln in lines if any(s in ln for s in QEMU_ONLY_CLOUD_INIT_ERRORS)]
    errors = [ln for ln in lines if ln not in excused]
    note = (f"; {len(excused)} line(s) excused: no primary DHCP interface, because QEMU's DHCP sends no "
            "option 121/245 routes (Azure's does)" if excused else "")
    if errors:
        return failed(f"{len(errors)} error/failure line(s) in cloud-init.log{note}", res)
    return passed(f"no errors in cloud-init.log{note}", res)


@CHECKS.add(
    "standard.serial-console",
    title="Serial console enabled",
    verifies="A login prompt runs on ttyS0 and the kernel console points there, so Azure's serial console "
    "can be used to rescue the VM.",
    source="LISA verify_serial_console_is_enabled",
)
def serial_console(ctx: CheckContext) -> CheckResult:
    args, cmd = _cmdline_args(ctx)
    res = ctx.probe(SERIAL)
    if res.stdout.split()[:1] and res.stdout.split()[0] not in ACTIVE_STATES:
        raise ctx.probe_failed("systemctl is-active printed no unit state", res)
    problems = []
    if res.stdout.split()[:1] != ["active"]:
        problems.append("no getty on ttyS0 (serial-getty@ttyS0.service is not active)")
    if not any(re.match(r"^console=ttyS0(,.*)?$", a) for a in args):
        problems.append("console=ttyS0 missing from the kernel command line")
    if problems:
        return failed("; ".join(problems), res, cmd)
    return passed("serial-getty@ttyS0 active; console=ttyS0", res, cmd)


@CHECKS.add(
    "standard.services-enabled",
    title="sshd and the agents enabled at boot",
    verifies="sshd and the Azure agent (and cloud-init, where it provisions) are enabled at boot, or a VM "
    "made from the image is unreachable and never reports Ready.",
    source="create-upload-generic.md: sshd enabled at boot; waagent (and cloud-init) enabled",
)
def services_enabled(ctx: CheckContext) -> CheckResult:
    res = ctx.probe(SERVICES)
    state = dict(ln.split(None, 1) for ln in res.stdout.splitlines() if len(ln.split(None, 1)) == 2)
    if set(state) != set(SERVICE_UNITS):
        raise ctx.probe_failed("expected one line per unit: " + ", ".join(SERVICE_UNITS), res)
    ok = ("enabled", "enabled-runtime", "alias", "static", "generated")
    problems = []
    if not any(state.get(u) in ok for u in ("ssh.service", "sshd.service")):
        problems.append("sshd is not enabled")
    if not any(state.get(u) in ok for u in WAAGENT_UNITS):
        problems.append("the Azure agent is not enabled")
    # cloud-init 24.3 renamed cloud-init.service to cloud-init-network.service (Debian 13 ships 25.1).
    if ctx.distro.agent is Agent.CLOUD_INIT and not (
        state.get("cloud-init-local.service") in ok
        and any(state.get(u) in ok for u in ("cloud-init.service", "cloud-init-network.service"))
    ):
        problems.append("cloud-init is not enabled (cloud-init-local and cloud-init[-network].service)")
    if problems:
        return failed("; ".join(problems), res)
    return passed("sshd and the agent(s) enabled", res)

