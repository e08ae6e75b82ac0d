"""``scan FILE``: the offline leak scan of an image file from anywhere, with no build VM to name.

Fast lane: the rules over a plain tree find a leftover build user by what it left, told no name. VM lane
(marker ``vm``: these build disk images): images made from Debian packages by a recipe of their own
(:mod:`tests.byoi`), clean and dirty, in several formats, scanned through the task as a user runs it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from imagekit.scan.rules import ScanInput, leftover_users, scan_tree
from tests import byoi

BUILD_USER = "azureuser"
# What `waagent -force -deprovision+user` leaves when no ovf-env.xml was present: it skips deleting the
# user, so the account, its home with authorized_keys and waagent's passwordless sudoers rule stay.
SURVIVOR = {
    "/etc/passwd": f"{BUILD_USER}:x:1000:1000:{BUILD_USER}:/home/{BUILD_USER}:/bin/bash\n",
    "/etc/shadow": f"{BUILD_USER}:!:20000:0:99999:7:::\n",
    "/etc/group": f"{BUILD_USER}:x:1000:\n",
    "/etc/sudoers.d/waagent": f"{BUILD_USER} ALL=(ALL) NOPASSWD: ALL\n",
    f"/home/{BUILD_USER}/.ssh/authorized_keys": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB9 build@host\n",
    "/var/log/auth.log": f"sshd[812]: Accepted publickey for {BUILD_USER} from 10.0.2.2 port 51234 ssh2\n",
}
SURVIVOR_FOUND = [
    # the account's name in /etc files is reported too (as for a name the build gives)
    ("config-secret", "/etc/group"), ("config-secret", "/etc/passwd"), ("config-secret", "/etc/shadow"),
    ("config-secret", "/etc/sudoers.d/waagent"),
    ("home", f"/home/{BUILD_USER}"), ("log-secret", "/var/log/auth.log"),
    ("user", "/etc/group"), ("user", "/etc/passwd"), ("user", "/etc/shadow"), ("user", "/etc/sudoers.d/waagent"),
]


def _plant_survivor(root: Path) -> None:
    for rel, text in SURVIVOR.items():
        p = root / rel.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        with p.open("a") as fh:
            fh.write(text)


def _minimal_tree(root: Path) -> None:
    byoi.write(root, "/etc/passwd", "root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65534::/nonexistent:/bin/false\n")
    byoi.write(root, "/etc/shadow", "root:*:19000:0:99999:7:::\n", 0o640)
    byoi.write(root, "/etc/group", "root:x:0:\nsudo:x:27:\n")
    byoi.write(root, "/etc/sudoers", "Defaults env_reset\nroot ALL=(ALL:ALL) ALL\n%sudo ALL=(ALL:ALL) ALL\n"
               "@includedir /etc/sudoers.d\n", 0o440)
    byoi.write(root, "/etc/sudoers.d/README", "# files here are read by sudo\n", 0o440)
    byoi.write(root, "/etc/machine-id", "")
    (root / "home").mkdir()


def test_no_name_scan_finds_the_surviving_build_user(tmp_path: Path) -> None:
    _minimal_tree(tmp_path)
    assert scan_tree(tmp_path, ScanInput()) == []
    _plant_survivor(tmp_path)
    assert leftover_users(tmp_path) == [BUILD_USER]
    findings = scan_tree(tmp_path, ScanInput())
    assert sorted({(f.kind, f.path) for f in findings}) == SURVIVOR_FOUND, findings
    details = {f.path: f.detail for f in findings if f.kind in ("home",)}
    assert "authorized_keys" in details[f"/home/{BUILD_USER}"]
    sudo = [f.detail for f in findings if f.path == "/etc/sudoers.d/waagent" and f.kind == "user"]
    assert sudo == [f"a sudoers rule for the user {BUILD_USER!r} without a password (NOPASSWD)"]


@pytest.mark.parametrize(("line", "user"), [
    ("deploy ALL=(ALL) NOPASSWD:ALL\n", "deploy"),  # a user the image has no account for
    ("alice,bob ALL=(ALL) ALL\n", "alice"),
])
def test_sudoers_rules_that_name_a_user_are_found(tmp_path: Path, line: str, user: str) -> None:
    _minimal_tree(tmp_path)
    byoi.write(tmp_path, "/etc/sudoers.d/90-cloud-init-users", "# Created by cloud-init\n" + line, 0o440)
    found = [(f.kind, f.path) for f in scan_tree(tmp_path, ScanInput())]
    assert ("user", "/etc/sudoers.d/90-cloud-init-users") in found
    assert user in leftover_users(tmp_path)


def test_sudoers_group_rules_aliases_and_skipped_files_are_not_findings(tmp_path: Path) -> None:
    _minimal_tree(tmp_path)
    byoi.write(tmp_path, "/etc/sudoers.d/10-ops", "User_Alias OPS = %ops\nCmnd_Alias UP = /usr/bin/apt\n"
               "%ops ALL=(ALL) UP\nDefaults:%ops !lecture\n", 0o440)
    byoi.write(tmp_path, "/etc/sudoers.d/old.dpkg-old", "mallory ALL=(ALL) ALL\n", 0o440)  # sudo skips names with '.'
    assert scan_tree(tmp_path, ScanInput()) == []


def test_a_member_of_the_sudo_group_is_found(tmp_path: Path) -> None:
    _minimal_tree(tmp_path)
    byoi.write(tmp_path, "/etc/group", "root:x:0:\nsudo:x:27:builder\n")
    assert [(f.kind, f.detail) for f in scan_tree(tmp_path, ScanInput())] == [
        ("user", "'builder' is a member of the administrators' group 'sudo'")]
