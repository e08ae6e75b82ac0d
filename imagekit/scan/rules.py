"""What must not ship in a captured image, checked over a root filesystem tree without booting it.

:func:`scan_tree` takes the directory where an image's root filesystem is mounted (read-only) and returns
one :class:`Finding` per leak, each naming the file. The rules follow what ``waagent -deprovision+user``
and ``cloud-init clean`` exist to remove (azure-platform.md §6), Azure's certification gates
(image-standards.md §1: no default credentials, empty shell history) and what imagekit's own test set-up
touches (azure-platform.md §8: cloud-init's ``comment=cloudconfig`` lines in /etc/fstab).

Run as ``python -m imagekit.scan.rules ROOT`` with the :class:`ScanInput` as JSON on stdin (secrets never on
a command line), it prints the findings as JSON: this is how :mod:`imagekit.generalize.deprovision` runs it inside a
private mount namespace.
"""

from __future__ import annotations

import gzip
import json
import lzma
import os
import re
import stat
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Kinds, in the order a report lists them.
KINDS = (
    "user", "home", "credentials", "ssh-host-key", "waagent-state", "cloud-init-state", "history",
    "dhcp-lease", "machine-id", "hostname", "test-artifact", "fstab", "log-secret", "config-secret",
    "filesystem",
)
MAX_READ = 64 << 20  # bytes read per file when searching contents (journals are big but bounded)
HISTORY_NAMES = re.compile(r"^\.(.*_history|history|lesshst|viminfo)$")
TEST_MARK = "imagekit"
# cloud-init tags the fstab lines it writes; the resource disk's serial names the disk our test set-up used.
FSTAB_MARKS = ("comment=cloudconfig", "RESOURCEDISK")
LEASE_GLOBS = (
    "var/lib/dhcp/*", "var/lib/dhclient/*", "var/lib/dhcpcd/*", "var/lib/dhcpcd5/*",
    "var/lib/NetworkManager/*.lease", "var/lib/NetworkManager/*lease*", "var/db/dhclient.leases.*",
    "var/lib/systemd/netif/leases/*", "var/lib/wicked/lease*",
)


@dataclass(frozen=True)
class Finding:
    kind: str
    path: str  # absolute path inside the image
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.path}: {self.detail}"


@dataclass
class ScanInput:
    """What the scan looks for besides the fixed rules. ``password`` is a secret: never logged."""

    usernames: list[str] = field(default_factory=list)
    hostnames: list[str] = field(default_factory=list)
    password: str | None = field(default=None, repr=False)


def _p(root: Path, rel: str) -> Path:
    return root / rel.lstrip("/")


def _abs(root: Path, path: Path) -> str:
    return "/" + str(path.relative_to(root))


def _read(path: Path, limit: int = MAX_READ) -> bytes:
    try:
        with path.open("rb") as fh:
            return fh.read(limit)
    except OSError:
        return b""


def _is_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.lstat().st_mode)
    except OSError:
        return False


def _walk_files(top: Path) -> Iterator[Path]:
    """Regular files under ``top``, not following symlinks (an image's absolute links point at the host)."""
    if not top.is_dir() or top.is_symlink():
        return
    for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if _is_file(p):
                yield p


def _empty_dir(path: Path) -> bool:
    try:
        return path.is_dir() and not path.is_symlink() and next(path.iterdir(), None) is None
    except OSError:
        return False


def _word(term: str) -> re.Pattern[bytes]:
    return re.compile(rb"(?<![A-Za-z0-9_.-])" + re.escape(term.encode()) + rb"(?![A-Za-z0-9_-])")


def _decompressed(path: Path, data: bytes) -> bytes:
    try:
        if path.suffix == ".gz":
            return gzip.decompress(data)
        if path.suffix == ".xz":
            return lzma.decompress(data)
    except (OSError, EOFError, lzma.LZMAError):
        pass
    return data


def scan_tree(root: Path, inp: ScanInput) -> list[Finding]:
    """Every leak found under ``root`` (the image's ``/``).

    Besides the names in ``inp`` (the build VM's, when the build scans its own capture), the names of the
    users the image itself shows to be left over are searched for: regular accounts, homes and sudoers rules
    (a scan of a file from elsewhere knows no names)."""
    inp = ScanInput(usernames=sorted(set(inp.usernames) | set(leftover_users(root))), hostnames=inp.hostnames,
                    password=inp.password)
    f: list[Finding] = []
    f += _users(root, inp)
    f += _sudoers(root)
    f += _homes(root)
    f += _host_keys(root)
    f += _waagent(root)
    f += _cloud_init(root)
    f += _histories(root)
    f += _leases(root)
    f += _machine_id(root)
    f += _hostnames(root, inp)
    f += _fstab(root)
    f += _test_artifacts(root)
    f += _secrets(root, inp)
    order = {k: i for i, k in enumerate(KINDS)}
    return sorted(set(f), key=lambda x: (order.get(x.kind, 99), x.path, x.detail))


def _users(root: Path, inp: ScanInput) -> list[Finding]:
    out = []
    for name, uid in _regular_accounts(root):
        out.append(Finding("user", "/etc/passwd", f"regular user account {name!r} (uid {uid})"))
    for name in inp.usernames:
        for rel in ("/etc/passwd", "/etc/shadow", "/etc/group", "/etc/gshadow", "/etc/subuid", "/etc/subgid"):
            for line in _read(_p(root, rel)).decode(errors="replace").splitlines():
                fields = line.split(":")
                members = fields[3].split(",") if rel in ("/etc/group", "/etc/gshadow") and len(fields) > 3 else []
                if fields[0] == name or name in members:
                    out.append(Finding("user", rel, f"entry for the provisioned user {name!r}"))
        for rel in (f"/var/mail/{name}", f"/var/spool/mail/{name}", f"/var/spool/cron/crontabs/{name}"):
            if _p(root, rel).exists():
                out.append(Finding("user", rel, f"file of the provisioned user {name!r}"))
    shadow = _read(_p(root, "/etc/shadow")).decode(errors="replace")
    for line in shadow.splitlines():
        parts = line.split(":")
        if len(parts) > 1 and parts[1].startswith("$"):
            out.append(Finding("credentials", "/etc/shadow", f"account {parts[0]!r} has a password hash"))
    return out


SUDO_GROUPS = ("sudo", "wheel", "admin")
_SUDOERS_SKIP = re.compile(r"^(Defaults\b|(User|Runas|Host|Cmnd)_Alias\b|[@#]include(dir)?\b)")
_NAME = re.compile(r"^[a-z_][a-z0-9_.-]*\$?$", re.IGNORECASE)


def _regular_accounts(root: Path) -> list[tuple[str, int]]:
    out = []
    for line in _read(_p(root, "/etc/passwd")).decode(errors="replace").splitlines():
        parts = line.split(":")
        if len(parts) >= 7 and parts[2].isdigit() and 1000 <= int(parts[2]) < 60000:
            out.append((parts[0], int(parts[2])))
    return out


def _sudoers_files(root: Path) -> list[Path]:
    files = [_p(root, "/etc/sudoers")]
    d = _p(root, "/etc/sudoers.d")
    if d.is_dir() and not d.is_symlink():
        files += sorted(p for p in d.iterdir() if "." not in p.name and not p.name.endswith("~"))
    return [p for p in files if _is_file(p)]


def _sudoers_rules(root: Path) -> list[tuple[Path, str, str]]:
    """(file, user, line) for each sudoers rule that names a user (not a %group) other than root."""
    out = []
    for p in _sudoers_files(root):
        for line in _read(p).decode(errors="replace").splitlines():
            text = line.strip()
            if not text or _SUDOERS_SKIP.match(text) or text.startswith("#"):
                continue
            subject = text.split(None, 1)[0].rstrip(",")
            for user in subject.split(","):
                if user and not user.startswith(("%", "+", "#")) and user not in ("root", "ALL") \
                        and _NAME.match(user):
                    out.append((p, user, text))
    return out


def leftover_users(root: Path) -> list[str]:
    """Users the image shows to be left over from the VM it was made on, without being told their names:
    regular accounts (uid 1000 to 59999), directories in /home, users named by a sudoers rule."""
    names = {name for name, _ in _regular_accounts(root)}
    home = _p(root, "/home")
    if home.is_dir() and not home.is_symlink():
        names |= {e.name for e in home.iterdir() if e.name != "lost+found" and _NAME.match(e.name)}
    names |= {user for _, user, _ in _sudoers_rules(root)}
    return sorted(names)


def _sudoers(root: Path) -> list[Finding]:
    out = []
    for p, user, line in _sudoers_rules(root):
        nopasswd = " without a password (NOPASSWD)" if "NOPASSWD" in line else ""
        out.append(Finding("user", _abs(root, p), f"a sudoers rule for the user {user!r}{nopasswd}"))
    for line in _read(_p(root, "/etc/group")).decode(errors="replace").splitlines():
        fields = line.split(":")
        if len(fields) > 3 and fields[0] in SUDO_GROUPS:
            for member in fields[3].split(","):
                if member.strip() and member.strip() != "root":
                    out.append(Finding("user", "/etc/group", f"{member.strip()!r} is a member of the "
                                       f"administrators' group {fields[0]!r}"))
    return out


def _homes(root: Path) -> list[Finding]:
    out = []
    home = _p(root, "/home")
    if home.is_dir():
        for entry in sorted(home.iterdir()):
            if entry.name == "lost+found" and _empty_dir(entry):
                continue  # mke2fs's own, when /home is a file system of its own
            keys = [n for n in ("authorized_keys", "authorized_keys2") if _is_file(entry / ".ssh" / n)]
            held = f" (with .ssh/{', .ssh/'.join(keys)}: SSH keys that log in to every VM made from it)" if keys else ""
            out.append(Finding("home", _abs(root, entry), f"a home directory left in the image{held}"))
    for rel in ("/root/.ssh/authorized_keys", "/root/.ssh/authorized_keys2"):
        p = _p(root, rel)
        if _is_file(p) and p.stat().st_size:
            out.append(Finding("credentials", rel, "root has authorized SSH keys"))
    return out


def _host_keys(root: Path) -> list[Finding]:
    d = _p(root, "/etc/ssh")
    if not d.is_dir():
        return []
    return [Finding("ssh-host-key", _abs(root, p), "SSH host key (every VM from the image would share it)")
            for p in sorted(d.glob("ssh_host_*key*"))]


def _waagent(root: Path) -> list[Finding]:
    out = []
    for p in _walk_files(_p(root, "/var/lib/waagent")):
        rel = _abs(root, p)
        detail = {
            "provisioned": "waagent's provisioned marker: a new VM would not be provisioned",
            "ovf-env.xml": "the provisioning OVF of the build VM",
            "CustomData": "the build VM's custom data",
        }.get(p.name, "waagent state of the build VM")
        out.append(Finding("waagent-state", rel, detail))
    return out


def _cloud_init(root: Path) -> list[Finding]:
    out = []
    base = _p(root, "/var/lib/cloud")
    inst = base / "instance"
    if inst.is_symlink() or inst.exists():
        out.append(Finding("cloud-init-state", "/var/lib/cloud/instance", "cloud-init instance link"))
    for sub in ("instances", "data", "sem", "handlers"):
        d = base / sub
        if d.is_dir() and not d.is_symlink():
            for entry in sorted(d.iterdir()):
                out.append(Finding("cloud-init-state", _abs(root, entry), f"cloud-init {sub} state"))
    seed = base / "seed" / "azure" / "ovf-env.xml"
    if seed.exists():
        out.append(Finding("cloud-init-state", _abs(root, seed), "an Azure OVF seed"))
    return out


def _histories(root: Path) -> list[Finding]:
    out = []
    tops = [_p(root, "/root")]
    home = _p(root, "/home")
    if home.is_dir():
        tops += [d for d in home.iterdir() if d.is_dir() and not d.is_symlink()]
    for top in tops:
        if not top.is_dir():
            continue
        for p in sorted(top.iterdir()):
            if HISTORY_NAMES.match(p.name) and _is_file(p) and p.stat().st_size:
                out.append(Finding("history", _abs(root, p), f"shell/program history ({p.stat().st_size} bytes)"))
    return out


def _leases(root: Path) -> list[Finding]:
    out = []
    for pattern in LEASE_GLOBS:
        for p in sorted(root.glob(pattern)):
            if _is_file(p):
                out.append(Finding("dhcp-lease", _abs(root, p), "a DHCP lease of the build VM"))
    return out


def _machine_id(root: Path) -> list[Finding]:
    out = []
    mid = _p(root, "/etc/machine-id")
    if _is_file(mid):
        text = _read(mid).decode(errors="replace").strip()
        if text and text != "uninitialized":
            out.append(Finding("machine-id", "/etc/machine-id",
                               "not empty: every VM from the image would share one machine id"))
    dbus = _p(root, "/var/lib/dbus/machine-id")
    if _is_file(dbus) and _read(dbus).strip():
        out.append(Finding("machine-id", "/var/lib/dbus/machine-id", "not empty (and not a link to /etc/machine-id)"))
    return out


def _hostnames(root: Path, inp: ScanInput) -> list[Finding]:
    out = []
    for name in inp.hostnames:
        pat = _word(name)
        for rel in ("/etc/hostname", "/etc/hosts", "/etc/mailname"):
            if pat.search(_read(_p(root, rel))):
                out.append(Finding("hostname", rel, f"names the build VM's hostname {name!r}"))
    return out


def _fstab(root: Path) -> list[Finding]:
    out = []
    for i, line in enumerate(_read(_p(root, "/etc/fstab")).decode(errors="replace").splitlines(), 1):
        if line.lstrip().startswith("#"):
            continue
        for mark in FSTAB_MARKS:
            if mark in line:
                out.append(Finding("fstab", "/etc/fstab",
                                   f"line {i} was added by the test set-up ({mark}): {line.strip()}"))
                break
    return out


def _test_artifacts(root: Path) -> list[Finding]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in [*dirnames, *filenames]:
            if TEST_MARK in name.lower():
                out.append(Finding("test-artifact", _abs(root, Path(dirpath) / name),
                                   "placed by imagekit for testing"))
    return out


def _secrets(root: Path, inp: ScanInput) -> list[Finding]:
    """The provisioned username or password in logs (anywhere under /var/log) or in /etc."""
    terms: list[tuple[str, re.Pattern[bytes]]] = [("the provisioned username", _word(u)) for u in inp.usernames]
    if inp.password:
        terms.append(("the provisioning password", re.compile(re.escape(inp.password.encode()))))
    if not terms:
        return []
    out = []
    for kind, top in (("log-secret", "/var/log"), ("config-secret", "/etc")):
        for p in _walk_files(_p(root, top)):
            data = _decompressed(p, _read(p))
            for what, pat in terms:
                if pat.search(data):
                    out.append(Finding(kind, _abs(root, p), f"contains {what}"))
    return out


def main() -> int:
    root = Path(sys.argv[1])
    raw = json.loads(sys.stdin.read() or "{}")
    inp = ScanInput(usernames=list(raw.get("usernames", [])), hostnames=list(raw.get("hostnames", [])),
                    password=raw.get("password"))
    findings = scan_tree(root, inp)
    json.dump([asdict(x) for x in findings], sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
