"""The guest-side shell of the checks, run for real: each probe string the SSH connection would send runs
under /bin/sh (dash) against a planted fake root (tests/fakeroot.py), and the check judges what it printed.
The expectations are written out here from the planted files (which users, which files, which lines),
not taken from the product's tables, so a change to a probe's shell logic (an account filter, a glob, a
grep pattern) shows up as a failing test."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagekit.checks import CheckContext, CheckResult, HealthReport, RecordedFabric, Status, catalogue, plan_for
from imagekit.config import distros
from imagekit.config.profile import ProvisioningProfile
from imagekit.vm.guest import Guest
from tests.fakeroot import FakeRoot, can_run

pytestmark = pytest.mark.skipif(not can_run(), reason="needs root and unshare (private mount namespaces)")

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGVxYW1wbGVrZXlmb3J0ZXN0c29ubHkxMjM0NTY3ODkw imagekit-test"
OTHER_KEY = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQCbuilder builder@ci"
PROFILE = ProvisioningProfile(hostname="ikvm", username="azureuser", ssh_public_keys=(KEY,))
HASH = "$6$rounds=5000$saltsalt$" + "x" * 86
# A provisioned Debian guest's accounts: system users below uid 1000, nobody at 65534, the OVF user.
BASE_USERS = [("root", 0, "/root", "*"), ("daemon", 1, "/usr/sbin", "*"), ("_apt", 42, "/nonexistent", "*"),
              ("nobody", 65534, "/nonexistent", "*"), ("azureuser", 1000, "/home/azureuser", "!")]


def run_check(check_id: str, guest: Guest, distro_id: str = "debian-12") -> CheckResult:
    d = distros.get(distro_id)
    ctx = CheckContext(guest=guest, distro=d, profile=PROFILE, plan=plan_for(d),
                       fabric=RecordedFabric((HealthReport("Ready"),)))
    return catalogue()[check_id].run(ctx)


@pytest.fixture
def fake(tmp_path: Path) -> FakeRoot:
    f = FakeRoot(tmp_path / "root")
    f.users(BASE_USERS)
    f.write("/home/azureuser/.ssh/authorized_keys", KEY + "\n", 0o600)
    return f


# --- accounts -------------------------------------------------------------------------------------------


def test_a_clean_guest_has_only_the_provisioned_user(fake: FakeRoot) -> None:
    r = run_check("standard.no-preexisting-users", fake.guest())
    assert r.status is Status.PASS, (r.summary, r.evidence)
    assert "only azureuser" in r.summary


def test_left_behind_users_passwords_and_keys_are_found(fake: FakeRoot) -> None:
    fake.users([*BASE_USERS, ("builder", 1001, "/home/builder", HASH), ("svc", 999, "/var/lib/svc", ""),
                ("bigid", 60000, "/home/bigid", "!")])
    fake.write("/home/builder/.ssh/authorized_keys", OTHER_KEY + "\n\n" + KEY + "\n", 0o600)
    fake.write("/root/.ssh/authorized_keys", OTHER_KEY + "\n", 0o600)
    r = run_check("standard.no-preexisting-users", fake.guest())
    assert r.status is Status.FAIL, (r.summary, r.evidence)
    for expected in ("user builder (uid=1001)", "user bigid (uid=60000)", "builder has a password",
                     "svc has an empty password", "builder has SSH keys in /home/builder/.ssh/authorized_keys",
                     "root has SSH keys in /root/.ssh/authorized_keys"):
        assert expected in r.summary, (expected, r.summary)
    # a system account (uid < 1000) is not a login user; nobody (65534) neither; locked or '*' is no password
    for unexpected in ("user svc", "user nobody", "user daemon", "root has a password", "azureuser"):
        assert unexpected not in r.summary.split("left behind: ", 1)[1], (unexpected, r.summary)
    assert "keys builder /home/builder/.ssh/authorized_keys 2" in r.evidence  # two key lines, blank skipped


def test_account_listing_as_a_non_root_user_is_an_error(fake: FakeRoot) -> None:
    """What a guest whose sudo silently did not apply would do: /etc/shadow unreadable, homes unreadable."""
    r = run_check("standard.no-preexisting-users", fake.guest(uid=65534))
    assert r.status is Status.ERROR, (r.summary, r.evidence)
    assert "not running as root" in r.evidence


def test_unreadable_shadow_is_an_error_not_a_pass(fake: FakeRoot) -> None:
    fake.path("/etc/shadow").unlink()
    fake.mkdir("/etc/shadow")  # awk cannot read a directory as a file
    r = run_check("standard.no-preexisting-users", fake.guest())
    assert r.status is Status.ERROR, (r.summary, r.evidence)
    assert "/etc/shadow" in r.evidence


# --- shell history --------------------------------------------------------------------------------------


def test_no_history_files_passes(fake: FakeRoot) -> None:
    r = run_check("standard.shell-history", fake.guest())
    assert r.status is Status.PASS, (r.summary, r.evidence)
    assert r.summary == "no shell history files"


def test_non_empty_histories_of_root_and_users_are_found(fake: FakeRoot) -> None:
    fake.users([*BASE_USERS, ("builder", 1001, "/home/builder", "!"), ("svc", 999, "/var/lib/svc", "!")])
    fake.write("/root/.bash_history", "sudo apt-get install secret-thing\n")
    fake.write("/home/azureuser/.python_history", "import os\n")
    fake.write("/home/builder/.zsh_history", "")  # empty: fine
    fake.write("/var/lib/svc/.bash_history", "x\n")  # a system account's home is not searched
    r = run_check("standard.shell-history", fake.guest())
    assert r.status is Status.FAIL, (r.summary, r.evidence)
    assert r.summary == ("2 non-empty history file(s): /home/azureuser/.python_history, /root/.bash_history"
                         ) or r.summary == ("2 non-empty history file(s): /root/.bash_history, "
                                            "/home/azureuser/.python_history"), r.summary
    assert "/home/builder/.zsh_history 0" in r.evidence


def test_history_listing_as_a_non_root_user_is_an_error(fake: FakeRoot) -> None:
    fake.write("/root/.bash_history", "secret\n")
    r = run_check("standard.shell-history", fake.guest(uid=65534))
    assert r.status is Status.ERROR, (r.summary, r.evidence)


def test_unreadable_passwd_makes_history_an_error(fake: FakeRoot) -> None:
    fake.path("/etc/passwd").unlink()
    fake.mkdir("/etc/passwd")
    r = run_check("standard.shell-history", fake.guest())
    assert r.status is Status.ERROR, (r.summary, r.evidence)


# --- sshd, fstab and swap, modules, the agent's log -------------------------------------------------------


def test_sshd_settings_come_from_sshd_t_and_a_failing_sshd_is_an_error(fake: FakeRoot) -> None:
    fake.tool("sshd", '[ "$1" = -T ] && printf "port 22\\npasswordauthentication yes\\nclientaliveinterval 300\\n"')
    r = run_check("standard.client-alive-interval", fake.guest())
    assert r.status is Status.FAIL and "ClientAliveInterval is 300" in r.summary, r.summary
    assert run_check("provisioning.password-auth", fake.guest()).status is Status.FAIL
    fake.tool("sshd", "echo 'sshd: no hostkeys available -- exiting.' >&2; exit 1")
    r = run_check("standard.client-alive-interval", fake.guest())
    assert r.status is Status.ERROR and "no hostkeys available" in r.evidence, (r.summary, r.evidence)


LSBLK_JSON = ('{"blockdevices": [{"name": "/dev/sda", "kname": "/dev/sda", "type": "disk", "size": 32212254720, '
              '"children": [{"name": "/dev/sda1", "kname": "/dev/sda1", "type": "part", "size": 32211206144, '
              '"fstype": "ext4", "mountpoint": "/"}]}]}')


def test_swap_in_fstab_and_proc_swaps_on_the_os_disk_is_found(fake: FakeRoot) -> None:
    fake.tool("lsblk", f"echo '{LSBLK_JSON}'")
    fake.tool("findmnt", 'case "$*" in *--target*) echo /dev/sda1 ;; *) echo "/dev/sda1 ext4" ;; esac')
    fake.write("/etc/fstab", "# comment\nUUID=0a1b / ext4 errors=remount-ro 0 1\n/swap.img none swap sw 0 0\n")
    fake.write("/proc/swaps", "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n/swap.img file 1048572 0 -2\n")
    r = run_check("swap.not-on-os-disk", fake.guest())
    assert r.status is Status.FAIL, (r.summary, r.evidence)
    assert "active swap /swap.img (file) is on the OS disk /dev/sda" in r.summary
    assert "/etc/fstab activates swap from /swap.img" in r.summary
    fake.write("/etc/fstab", "UUID=0a1b / ext4 errors=remount-ro 0 1\n")
    fake.write("/proc/swaps", "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n")
    r = run_check("swap.not-on-os-disk", fake.guest())
    assert r.status is Status.PASS, (r.summary, r.evidence)


def test_a_blacklisted_udf_is_found_and_a_failing_showconfig_is_an_error(fake: FakeRoot) -> None:
    fake.tool("modprobe", 'case "$1" in --showconfig) printf "alias foo bar\\nblacklist udf\\n" ;; *) exit 0 ;; esac')
    r = run_check("standard.udf-vfat", fake.guest())
    assert r.status is Status.FAIL and "udf is blacklisted" in r.summary, (r.summary, r.evidence)
    fake.tool("modprobe", 'case "$1" in --showconfig) echo "modprobe: ERROR: could not open directory" >&2; '
                          "exit 1 ;; *) exit 0 ;; esac")
    r = run_check("standard.udf-vfat", fake.guest())
    assert r.status is Status.ERROR and "could not open directory" in r.evidence, (r.summary, r.evidence)


def test_waagent_log_errors_are_counted_and_a_missing_log_fails(fake: FakeRoot) -> None:
    fake.write("/var/log/waagent.log",
               "2026-11-22T01:00:00Z ERROR Daemon Failed to mount resource disk unable to detect disk topology\n"
               "2026-11-22T01:00:30Z INFO Daemon imagekit test shim: device_for_ide_port(1) -> sdb\n"
               "2026-11-22T01:02:00Z INFO ExtHandler fine\n"
               "2026-11-22T01:03:00Z ERROR ExtHandler Failed to download\n")
    r = run_check("standard.waagent-log", fake.guest())
    assert r.status is Status.FAIL and r.summary.startswith("1 error line(s)") and "1 line(s) excused" in r.summary, \
        r.summary
    assert "4:2026-11-22T01:03:00Z ERROR ExtHandler Failed to download" in r.evidence
    fake.path("/var/log/waagent.log").unlink()
    r = run_check("standard.waagent-log", fake.guest())
    assert r.status is Status.FAIL and "does not exist" in r.summary, (r.summary, r.evidence)
