"""Azure's image requirements that differ by distro family: the Hyper-V KVP daemon, network configuration
files, persistent network udev rules, sudo's targetpw and the package repositories.

Sources, cited again in each check:

- (L) LISA's AzureImageStandard suite (microsoft/lisa, microsoft/testsuites/core/azure_image_standard.py):
  verify_hv_kvp_daemon_installed, verify_network_file_configuration, verify_ifcfg_eth0,
  verify_udev_rules_moved, verify_dhcp_file_configuration, verify_default_targetpw,
  verify_repository_installed.
- (G) "Prepare Linux for imaging in Azure":
  https://learn.microsoft.com/azure/virtual-machines/linux/create-upload-generic
- (D) "Prepare a Debian VHD for Azure":
  https://learn.microsoft.com/azure/virtual-machines/linux/debian-create-upload-vhd
- (R) "Prepare a Red Hat-based virtual machine for Azure":
  https://learn.microsoft.com/azure/virtual-machines/linux/redhat-create-upload-vhd
- (S) "Prepare a SLES or openSUSE Leap virtual machine for Azure":
  https://learn.microsoft.com/azure/virtual-machines/linux/suse-create-upload-vhd

Every probe is one fixed shell script that reads absolute paths behind ``$IMAGEKIT_PROBE_ROOT`` (unset in
a guest, so the paths are the guest's own) and ends by printing ``PROBE_OK``; it is judged only when it
ran to that line with exit 0 (``CheckContext.probe``). A probe that failed, was refused or printed
nothing is an ``error`` result with the command and its stderr, never a pass. The unit tests run these
exact strings under ``/bin/sh`` with the variable pointing at a planted fake root.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from imagekit.base.apt import parse_deb822, parse_one_line
from imagekit.checks.registry import PROBE_OK, CheckContext, CheckResult, Checks, failed, passed
from imagekit.config.distros import Distro, Family
from imagekit.vm.guest import CommandResult

ROOT_VAR = "IMAGEKIT_PROBE_ROOT"
_R = f'r="${{{ROOT_VAR}:-}}"; '
# The offline form of systemctl reads unit files under a root; in a guest (no root given) the running
# manager answers.
_SYSTEMCTL = 'sc() { if [ -n "$r" ]; then systemctl --root="$r" "$@"; else systemctl "$@"; fi; }; '
_UNIT_DIRS = "/etc/systemd/system /run/systemd/system /lib/systemd/system /usr/lib/systemd/system"
_UDEV_DIRS = "/etc/udev/rules.d /run/udev/rules.d /lib/udev/rules.d /usr/lib/udev/rules.d"

# The KVP daemon's unit per packaging: Debian/Ubuntu hyperv-daemons and linux-cloud-tools
# (hv-kvp-daemon.service), Fedora/RHEL/Azure Linux hyperv-daemons (hypervkvpd.service), SUSE hyper-v
# (hv_kvp_daemon.service).
KVP_UNITS = ("hv-kvp-daemon.service", "hypervkvpd.service", "hv_kvp_daemon.service")
KVP_DEVICE = "/dev/vmbus/hv_kvp"
# What a KVP daemon needs to be present on Azure, by family (G: every family's install line carries
# hyperv-daemons; D: Debian images must have it; L: required and running on Azure Linux). Flatcar ships
# no package manager and is not covered by any of them.
KVP_FAMILIES = frozenset({Family.DEBIAN, Family.UBUNTU, Family.RHEL, Family.SUSE, Family.AZURELINUX})

KVP_PROBE = (
    _R + _SYSTEMCTL
    + f"for u in {' '.join(KVP_UNITS)}; do "
    f"f=''; for d in {_UNIT_DIRS}; do "
    'if [ -L "$r$d/$u" ] && [ "$(readlink "$r$d/$u")" = /dev/null ]; then echo "unit $u masked-link $d/$u"; '
    'elif [ -f "$r$d/$u" ] && [ -z "$f" ]; then f="$d/$u"; fi; done; '
    '[ -n "$f" ] || continue; '
    'echo "unit $u file $f"; '
    'echo "unit $u is-enabled $(sc is-enabled "$u" 2>&1 | head -n 1)"; '
    "grep -E '^(ExecStart|BindsTo|ConditionPathExists|WantedBy)=' \"$r$f\" | sed \"s|^|unit $u line |\"; "
    "x=$(sed -n 's/^ExecStart=[-@!+:]*\\([^ ]*\\).*/\\1/p' \"$r$f\" | head -n 1); "
    'if [ -n "$x" ] && [ -x "$r$x" ]; then echo "unit $u exec-ok $x"; else echo "unit $u exec-missing ${x:-none}"; fi; '
    'if [ -e "$r' + KVP_DEVICE + '" ]; then echo "unit $u is-active $(sc is-active "$u" 2>&1 | head -n 1)"; fi; '
    "done; "
    # One grep per rules directory, not per file: a process start costs a lot under emulation.
    f"for d in {_UDEV_DIRS}; do set -- \"$r$d\"/*.rules; [ -f \"$1\" ] || continue; "
    "grep -H 'hv_kvp' \"$@\" | sed \"s|^$r||; s|^|rule |\"; done; "
    'if [ -e "$r' + KVP_DEVICE + '" ]; then echo "device present"; else echo "device absent"; fi; '
    f"echo {PROBE_OK}"
)

PERSISTENT_NET_RULES = (
    "/etc/udev/rules.d/70-persistent-net.rules",
    "/etc/udev/rules.d/85-persistent-net-cloud-init.rules",
    "/etc/udev/rules.d/75-persistent-net-generator.rules",
    "/lib/udev/rules.d/75-persistent-net-generator.rules",
    "/usr/lib/udev/rules.d/75-persistent-net-generator.rules",
    "/usr/lib64/udev/rules.d/75-persistent-net-generator.rules",
    "/usr/lib64/udev/rules.d/70-persistent-net.rules",
)
NET_RULES_PROBE = (
    _R + f"for f in {' '.join(PERSISTENT_NET_RULES)}; do "
    'if [ -e "$r$f" ] || [ -L "$r$f" ]; then echo "present $f $(wc -c < "$r$f" 2>/dev/null || echo ?) bytes"; '
    "grep -o 'ATTR{address}==\"[^\"]*\"' \"$r$f\" 2>/dev/null | sed \"s|^|mac-rule $f |\"; fi; "
    'done; for n in "$r"/sys/class/net/*; do [ -f "$n/address" ] || continue; '
    'echo "nic ${n##*/} $(cat "$n/address")"; done; '
    f"echo {PROBE_OK}"
)

SUDOERS_PROBE = (
    _R + 'for p in "$r"/etc/sudoers "$r"/etc/sudoers.d/*; do [ -f "$p" ] || continue; f=${p#"$r"}; '
    "grep -nE '^[[:space:]]*Defaults.*targetpw' \"$p\" | sed \"s|^|$f:|\"; done; "
    '[ -f "$r/etc/sudoers" ] && echo "sudoers present" || echo "sudoers absent"; '
    f"echo {PROBE_OK}"
)

RHEL_NETWORK_PROBE = (
    _R + _SYSTEMCTL
    + "echo '== /etc/sysconfig/network'; cat \"$r/etc/sysconfig/network\" 2>&1; "
    "echo '== /etc/sysconfig/network-scripts/ifcfg-eth0'; cat \"$r/etc/sysconfig/network-scripts/ifcfg-eth0\" 2>&1; "
    "for f in \"$r\"/etc/NetworkManager/system-connections/*.nmconnection; do [ -f \"$f\" ] || continue; "
    "echo \"== keyfile ${f#\"$r\"}\"; cat \"$f\"; done; "
    "echo '== NetworkManager.service'; sc is-enabled NetworkManager.service 2>&1 | head -n 1; "
    f"echo {PROBE_OK}"
)

SUSE_DHCP_PROBE = (
    _R + "if [ -f \"$r/etc/sysconfig/network/dhcp\" ]; then "
    "grep -nE '^[[:space:]]*DHCLIENT_SET_HOSTNAME=' \"$r/etc/sysconfig/network/dhcp\" "
    "|| echo 'no DHCLIENT_SET_HOSTNAME line'; "
    "else echo 'dhcp file absent'; fi; "
    f"echo {PROBE_OK}"
)

REPOS_PROBE = (
    _R + "echo '== /etc/os-release'; grep -E '^(ID|VERSION_CODENAME|VERSION_ID)=' \"$r/etc/os-release\" 2>&1; "
    "for p in \"$r\"/etc/apt/sources.list \"$r\"/etc/apt/sources.list.d/*.list \"$r\"/etc/apt/sources.list.d/*.sources "
    "\"$r\"/etc/yum.repos.d/*.repo \"$r\"/etc/zypp/repos.d/*.repo; do [ -f \"$p\" ] || continue; "
    "echo \"== ${p#\"$r\"}\"; grep -vE '^[[:space:]]*(#|$)' \"$p\"; done; "
    f"echo {PROBE_OK}"
)

CHECKS = Checks()


def _probe(ctx: CheckContext, command: str) -> tuple[list[str], CommandResult]:
    """The probe's output lines; a probe that did not run to its closing marker raises ProbeFailed."""
    res = ctx.probe(command, marker=True)
    return res.stdout.splitlines(), res


def _sections(lines: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    cur = ""
    for ln in lines:
        if ln.startswith("== "):
            cur = ln[3:].strip()
            out.setdefault(cur, [])
        elif cur:
            out[cur].append(ln)
    return out


def _shell_vars(lines: list[str]) -> dict[str, str]:
    """KEY=value lines as sysconfig files write them (quotes dropped; later lines win)."""
    out: dict[str, str] = {}
    for ln in lines:
        m = re.match(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$", ln)
        if m:
            out[m.group(1)] = m.group(2).strip().strip("'\"")
    return out


# --- Hyper-V KVP daemon -------------------------------------------------------------------------------


def _kvp_applies(d: Distro) -> str | None:
    if d.family in KVP_FAMILIES:
        return None
    return f"no published KVP requirement for family {d.family.value}"


@CHECKS.add(
    "standard.hv-kvp-daemon",
    title="Hyper-V KVP daemon installed and started on Azure",
    verifies="The Hyper-V key-value-pair daemon is installed (unit and binary present), not masked, and "
    "started on Azure — enabled, or pulled in by a udev rule when the VMBus KVP device appears — because "
    "Azure reads the guest's network and provisioning telemetry through it (whether it runs can only be "
    "observed where VMBus exists, not under QEMU).",
    source="LISA verify_hv_kvp_daemon_installed (Azure Linux: must run; Debian family: reported when "
    "missing); debian-create-upload-vhd: hyperv-daemons installed; create-upload-generic and "
    "redhat-create-upload-vhd: install hyperv-daemons",
    applies=_kvp_applies,
)
def hv_kvp_daemon(ctx: CheckContext) -> CheckResult:
    lines, res = _probe(ctx, KVP_PROBE)
    units: dict[str, dict[str, list[str]]] = {}
    rules = [ln[5:] for ln in lines if ln.startswith("rule ")]
    device = "device present" in lines
    for ln in lines:
        f = ln.split(" ", 3)
        if f[0] == "unit" and len(f) >= 3:
            units.setdefault(f[1], {}).setdefault(f[2], []).append(f[3] if len(f) > 3 else "")
    if not units:
        return failed(f"no KVP daemon is installed: none of {', '.join(KVP_UNITS)} exists (Debian/Ubuntu: "
                      "hyperv-daemons; RHEL family and Azure Linux: hyperv-daemons; SUSE: hyper-v)", res)
    problems: list[str] = []
    notes: list[str] = []
    good: list[str] = []
    for unit, info in units.items():
        state = (info.get("is-enabled") or [""])[0].strip()
        if "masked-link" in info or state.startswith("masked"):
            problems.append(f"{unit} is masked")
            continue
        if "file" not in info:
            problems.append(f"{unit} has no unit file")
            continue
        if "exec-ok" not in info:
            problems.append(f"{unit} runs {(info.get('exec-missing') or ['?'])[0]}, which is not installed")
            continue
        by_udev = [r for r in rules if unit in r and "SYSTEMD_WANTS" in r and "hv_kvp" in r]
        enabled = state in ("enabled", "enabled-runtime", "alias", "linked", "linked-runtime")
        if not enabled and not by_udev:
            problems.append(f"{unit} is {state or 'in an unknown state'} and no udev rule starts it, so it "
                            "would not run on Azure")
            continue
        how = "enabled" if enabled else f"started by udev when {KVP_DEVICE} appears ({by_udev[0].split(':')[0]})"
        cond = [x for x in info.get("line", []) if x.startswith(("BindsTo=", "ConditionPathExists=")) and "hv_kvp" in x]
        if cond:
            how += f"; bound to the VMBus device ({cond[0]})"
        if device:
            active = (info.get("is-active") or [""])[0].strip()
            if active != "active":
                problems.append(f"{KVP_DEVICE} exists but {unit} is {active or 'not active'}")
                continue
            how += "; running"
        good.append(f"{unit} {how}")
    if not device:
        notes.append(f"{KVP_DEVICE} is absent (no VMBus under QEMU), so whether the daemon runs cannot be "
                     "observed here; only its installation and start-up wiring were checked")
    note = f" ({'; '.join(notes)})" if notes else ""
    if problems and not good:
        return failed("; ".join(problems) + note, res, *notes)
    return passed("; ".join(good) + note, res, *notes)


# --- persistent network udev rules -----------------------------------------------------------------------


@CHECKS.add(
    "standard.no-persistent-net-rules",
    title="No persistent network udev rules",
    verifies="No udev rule pins interface names to MAC addresses (70-persistent-net.rules, cloud-init's "
    "85-persistent-net-cloud-init.rules) and no generator writes them (75-persistent-net-generator.rules), "
    "because a VM made from the image has a new MAC: eth0 would be renamed and the VM would have no network.",
    source="LISA verify_udev_rules_moved; suse-create-upload-vhd: remove 70-persistent-net.rules and "
    "85-persistent-net-cloud-init.rules",
)
def no_persistent_net_rules(ctx: CheckContext) -> CheckResult:
    lines, res = _probe(ctx, NET_RULES_PROBE)
    present = [ln.split()[1] for ln in lines if ln.startswith("present ")]
    if not present:
        return passed(f"none of the {len(PERSISTENT_NET_RULES)} persistent-net rule paths exists", res)
    nics = {ln.split()[2].lower() for ln in lines if ln.startswith("nic ") and len(ln.split()) == 3}
    rule_macs: dict[str, set[str]] = {f: set() for f in present}
    for ln in lines:
        parts = ln.split()
        if ln.startswith("mac-rule ") and len(parts) == 3 and parts[1] in rule_macs:
            rule_macs[parts[1]].add(parts[2].split("==", 1)[1].strip('"').lower())
    # A rule file written at this boot (cloud-init's ifupdown renderer writes 70-persistent-net.rules at
    # provisioning) names only this VM's own NICs: no rename can follow from it here, and the generalize
    # step removes it before capture. Anything else would pin a name to a MAC the next VM will not have.
    own = [f for f in present if not f.endswith("generator.rules") and rule_macs[f] and rule_macs[f] <= nics]
    stale = [f for f in present if f not in own]
    if stale:
        return failed("persistent network rules present: " + ", ".join(stale), res)
    return passed(f"only rules for this VM's own NIC(s) ({', '.join(own)}: {', '.join(sorted(nics))}), written "
                  "at provisioning; removed by the generalize step before capture", res)


# --- sudo targetpw ------------------------------------------------------------------------------------------


@CHECKS.add(
    "standard.sudo-no-targetpw",
    title="sudo does not ask for root's password",
    verifies="No sudoers file sets `Defaults targetpw`, because Azure images have no root password: with it, "
    "sudo asks for a password nobody has and the provisioned user cannot administer the VM.",
    source="LISA verify_default_targetpw; suse-create-upload-vhd: comment out `Defaults targetpw`",
)
def sudo_no_targetpw(ctx: CheckContext) -> CheckResult:
    lines, res = _probe(ctx, SUDOERS_PROBE)
    # No /etc/sudoers (e.g. Flatcar keeps its defaults under /usr) sets no targetpw; that sudo works for
    # the provisioned user is provisioning.sudo's question.
    absent = " (there is no /etc/sudoers)" if "sudoers absent" in lines else ""
    hits = [ln for ln in lines if ln.startswith("/etc/sudoers")]
    hits = [h for h in hits if re.search(r"(^|[\s,])targetpw\b", h.split(":", 2)[-1]) and
            not re.search(r"!\s*targetpw", h.split(":", 2)[-1])]
    if hits:
        return failed("`Defaults targetpw` is set: " + "; ".join(hits), res)
    return passed(f"no `Defaults targetpw` in /etc/sudoers or /etc/sudoers.d{absent}", res)


# --- RHEL family network configuration -------------------------------------------------------------------


def _keyfiles(sec: dict[str, list[str]]) -> Iterator[tuple[str, dict[str, dict[str, str]]]]:
    for name, body in sec.items():
        if not name.startswith("keyfile "):
            continue
        groups: dict[str, dict[str, str]] = {}
        cur = ""
        for ln in body:
            s = ln.strip()
            if s.startswith("[") and s.endswith("]"):
                cur = s[1:-1]
                groups.setdefault(cur, {})
            elif "=" in s and cur:
                k, _, v = s.partition("=")
                groups[cur][k.strip()] = v.strip()
        yield name[len("keyfile "):], groups


@CHECKS.add(
    "standard.rhel-network",
    title="Network configuration (RHEL family)",
    verifies="/etc/sysconfig/network says NETWORKING=yes and eth0 comes up by DHCP at boot under "
    "NetworkManager — ifcfg-eth0 with DEVICE=eth0, BOOTPROTO=dhcp, ONBOOT=yes and not NM_CONTROLLED=no, or a "
    "NetworkManager keyfile for eth0 with ipv4 method auto that autoconnects — and NetworkManager is "
    "enabled, because otherwise a VM made from the image boots without network and never reports Ready.",
    source="LISA verify_network_file_configuration and verify_ifcfg_eth0; redhat-create-upload-vhd: "
    "NETWORKING=yes, ifcfg-eth0 (BOOTPROTO=dhcp, ONBOOT=yes, NM_CONTROLLED=yes), RHEL 8/9: "
    "NetworkManager enabled, eth0 autoconnect with ipv4.method auto",
    families=[Family.RHEL],
)
def rhel_network(ctx: CheckContext) -> CheckResult:
    lines, res = _probe(ctx, RHEL_NETWORK_PROBE)
    sec = _sections(lines)
    problems: list[str] = []
    net = sec.get("/etc/sysconfig/network", [])
    if any("No such file" in ln for ln in net):
        problems.append("/etc/sysconfig/network is missing")
    elif _shell_vars(net).get("NETWORKING", "").lower() != "yes":
        problems.append("/etc/sysconfig/network does not say NETWORKING=yes")
    ifcfg_lines = sec.get("/etc/sysconfig/network-scripts/ifcfg-eth0", [])
    how = ""
    if not any("No such file" in ln for ln in ifcfg_lines):
        v = _shell_vars(ifcfg_lines)
        bad = [f"{k}={v.get(k, '(unset)')} (needs {want})" for k, want in
               (("DEVICE", "eth0"), ("BOOTPROTO", "dhcp"), ("ONBOOT", "yes")) if v.get(k, "").lower() != want]
        if v.get("NM_CONTROLLED", "yes").lower() in ("no", "false"):
            bad.append("NM_CONTROLLED=no (NetworkManager would leave eth0 down)")
        if bad:
            problems.append("ifcfg-eth0: " + ", ".join(bad))
        else:
            how = "ifcfg-eth0 (DHCP at boot)"
    else:
        for path, groups in _keyfiles(sec):
            conn = groups.get("connection", {})
            if conn.get("interface-name") != "eth0":
                continue
            if conn.get("autoconnect", "true").lower() in ("false", "no", "0"):
                problems.append(f"{path}: autoconnect=false")
            elif groups.get("ipv4", {}).get("method", "auto") != "auto":
                problems.append(f"{path}: ipv4 method={groups['ipv4']['method']} (needs auto, i.e. DHCP)")
            else:
                how = f"NetworkManager keyfile {path} (DHCP, autoconnect)"
            break
        else:
            problems.append("no configuration for eth0: neither ifcfg-eth0 nor a NetworkManager keyfile with "
                            "interface-name=eth0")
    nm = [ln.strip() for ln in sec.get("NetworkManager.service", [])]
    if not nm or nm[0] not in ("enabled", "enabled-runtime", "alias"):
        problems.append(f"NetworkManager.service is {nm[0] if nm else 'unknown'}, not enabled")
    if problems:
        return failed("; ".join(problems), res)
    return passed(f"NETWORKING=yes; eth0 by {how}; NetworkManager enabled", res)


# --- SUSE DHCP hostname --------------------------------------------------------------------------------------


@CHECKS.add(
    "standard.suse-dhcp-hostname",
    title="DHCP does not set the host name (SUSE)",
    verifies='/etc/sysconfig/network/dhcp sets DHCLIENT_SET_HOSTNAME="no", so the DHCP client does not '
    "overwrite the host name the agent provisioned from the VM's name.",
    source="LISA verify_dhcp_file_configuration; suse-create-upload-vhd: DHCLIENT_SET_HOSTNAME=\"no\"",
    families=[Family.SUSE],
)
def suse_dhcp_hostname(ctx: CheckContext) -> CheckResult:
    lines, res = _probe(ctx, SUSE_DHCP_PROBE)
    if "dhcp file absent" in lines:
        return failed("/etc/sysconfig/network/dhcp does not exist", res)
    values = [ln.split("=", 1)[1].strip() for ln in lines if "DHCLIENT_SET_HOSTNAME=" in ln]
    if not values:
        return failed("/etc/sysconfig/network/dhcp has no DHCLIENT_SET_HOSTNAME line", res)
    if values[-1] != '"no"':
        return failed(f'DHCLIENT_SET_HOSTNAME={values[-1]}; Azure asks for DHCLIENT_SET_HOSTNAME="no"', res)
    return passed('DHCLIENT_SET_HOSTNAME="no"', res)


# --- repositories --------------------------------------------------------------------------------------------


def _ini_sections(lines: list[str]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    cur = ""
    for ln in lines:
        s = ln.strip()
        if s.startswith("[") and s.endswith("]"):
            cur = s[1:-1].strip()
            out.setdefault(cur, {})
        elif "=" in s and cur:
            k, _, v = s.partition("=")
            out[cur][k.strip().lower()] = v.strip()
    return out


def _on(section: dict[str, str], key: str, default: str = "1") -> bool:
    return section.get(key, default).strip().lower() in ("1", "yes", "true", "on")


def _repos_applies(d: Distro) -> str | None:
    return "Flatcar updates as a whole image and has no package repositories" if d.family is Family.FLATCAR else None


@CHECKS.add(
    "standard.repositories",
    title="Package repositories configured",
    verifies="The package manager is configured with the family's repositories, so a VM made from the image "
    "can install security updates: Debian the release's suite (main), Ubuntu the release plus -updates and "
    "-security, RHEL family BaseOS and AppStream (Oracle Linux a *_latest repository), Azure Linux its "
    "official base repository, SLES Pool and Updates, openSUSE enabled, refreshed OSS and update repositories.",
    source="LISA verify_repository_installed",
    applies=_repos_applies,
)
def repositories(ctx: CheckContext) -> CheckResult:
    lines, res = _probe(ctx, REPOS_PROBE)
    sec = _sections(lines)
    osr = _shell_vars(sec.get("/etc/os-release", []))
    fam = ctx.distro.family
    if fam in (Family.DEBIAN, Family.UBUNTU):
        entries = []
        for name, body in sec.items():
            text = "\n".join(body) + "\n"
            if name.endswith(".sources"):
                entries += parse_deb822(text)
            elif name.endswith(".list"):
                entries += parse_one_line(text)
        code = osr.get("VERSION_CODENAME", "")
        if not code:
            return failed("/etc/os-release names no VERSION_CODENAME, so the release's suite is unknown", res)
        suites = {s for e in entries if "main" in e.components and e.uri.startswith(("http://", "https://"))
                  for s in e.suites}
        want = [code] if fam is Family.DEBIAN else [code, f"{code}-updates", f"{code}-security"]
        missing = [s for s in want if s not in suites]
        if missing:
            return failed(f"no apt source with component main for suite(s) {', '.join(missing)} "
                          f"(configured: {', '.join(sorted(suites)) or 'none'})", res)
        return passed(f"apt sources for {', '.join(sorted(suites))}", res)
    repos: dict[str, dict[str, str]] = {}
    for name, body in sec.items():
        if name.endswith(".repo"):
            repos.update(_ini_sections(body))
    enabled = {rid: s for rid, s in repos.items() if _on(s, "enabled")}
    ids = ", ".join(sorted(enabled)) or "none"
    if fam is Family.RHEL:
        if osr.get("ID") == "ol":
            ok = any("latest" in rid for rid in enabled)
            need = "an Oracle Linux *_latest repository"
        else:
            ok = any("base" in rid.lower() for rid in enabled) and any("appstream" in rid.lower() for rid in enabled)
            need = "BaseOS and AppStream repositories"
        if not ok:
            return failed(f"missing {need} (enabled: {ids})", res)
        return passed(f"enabled repositories: {ids}", res)
    if fam is Family.AZURELINUX:
        if not any("official-base" in rid for rid in enabled):
            return failed(f"missing the official base repository (enabled: {ids})", res)
        return passed(f"enabled repositories: {ids}", res)
    if fam is Family.SUSE:
        if osr.get("ID", "").startswith("sles"):
            names = [f"{rid} {s.get('name', '')}" for rid, s in enabled.items()]
            missing = [w for w in ("Pool", "Updates") if not any(w in n for n in names)]
            if missing:
                return failed(f"no {' and no '.join(missing)} repository (enabled: {ids})", res)
            return passed(f"Pool and Updates repositories: {ids}", res)
        def kind(word: str) -> list[str]:
            return [rid for rid, s in enabled.items()
                    if re.search(word, f"{rid} {s.get('name', '')}".lower())
                    and not re.search(r"debug|non", f"{rid} {s.get('name', '')}".lower())
                    and _on(s, "autorefresh", "0")]
        missing = [w for w in ("oss", "update") if not kind(w)]
        if missing:
            return failed(f"no enabled, refreshed {' or '.join(missing)} repository (enabled: {ids})", res)
        return passed(f"OSS and update repositories: {ids}", res)
    return failed(f"no repository rule for family {fam.value}", res)
