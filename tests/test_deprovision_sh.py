"""Deprovisioning's claims, run for real: each claim's shell test — the string the root script in the guest
runs — under /bin/sh (dash) against planted fake roots (tests/fakeroot.py). On a root where the step did its
job every claim holds; on a root where it left each thing behind every claim is false; a claim whose file
cannot be read is false too (it proves nothing); and the script refuses to vouch for anything when it does
not run as root."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagekit.config import distros
from imagekit.core.errors import BuildError
from imagekit.generalize.deprovision import Claim, deprovision, plan
from tests.fakeroot import FakeRoot, can_run

pytestmark = pytest.mark.skipif(not can_run(), reason="needs root and unshare (private mount namespaces)")

USER = "ikbuild1"
HASH = "$6$rounds=5000$saltsalt$" + "x" * 86
CONF = "Provisioning.RegenerateSshHostKeyPair=y\nProvisioning.DeleteRootPassword=y\n"
# What each claim of the Debian 12 plan is about, written out here (one keyword of its description each).
EXPECTED_CLAIMS = ["/var/lib/waagent is gone", "/var/log/waagent.log is gone", "root's shell history is gone",
                   "DHCP leases are gone", "SSH host keys are gone", "root's password is locked",
                   f"user {USER} is gone", f"/home/{USER} is gone", f"no waagent sudoers line for {USER}",
                   f"no sudoers rule names {USER}", "sudoers still parses",
                   f"root's authorized_keys does not name {USER}",
                   f"no account-file backup names {USER}", "the lease clean-up unit is active",
                   "no persistent network rules in /etc/udev/rules.d", "no shell history under /root",
                   "/etc/machine-id is empty", f"no file under /var/log names {USER}"]
REPLACED = ("/etc/ssh", "/etc/sudoers.d", "/var/lib/waagent", "/var/lib/dhcp", "/var/log")


def claims() -> list[Claim]:
    return [c for s in plan(distros.get("debian-12"), USER) for c in s.claims]


def _base(root: Path) -> FakeRoot:
    f = FakeRoot(root)
    f.write("/etc/waagent.conf", CONF)
    f.write("/etc/passwd", "root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65534::/nonexistent:/bin/sh\n")
    f.write("/etc/shadow", "root:*:19000:0:99999:7:::\nnobody:*:19000:0:99999:7:::\n", 0o640)
    f.write("/etc/sudoers", "root ALL=(ALL:ALL) ALL\n@includedir /etc/sudoers.d\n", 0o440)
    for d in REPLACED:
        f.mkdir(d)
    f.write("/etc/passwd-", "root:x:0:0:root:/root:/bin/bash\n")
    f.write("/var/log/syslog", "Dec  1 10:00:00 host systemd[1]: Started something.\n")
    return f


def clean(root: Path) -> FakeRoot:
    f = _base(root)
    f.write("/etc/machine-id", "")
    f.tool("systemctl", '[ "$1 $2" = "is-active -q" ] && [ "$3" = ik-generalize-leases.service ]')
    return f


def dirty(root: Path) -> FakeRoot:
    f = _base(root)
    f.write("/var/lib/waagent/provisioned", "")
    f.write("/var/lib/waagent/ovf-env.xml", "<Environment/>")
    f.write("/var/log/waagent.log", "INFO started\n")
    f.write("/root/.bash_history", "ls\n")
    f.write("/etc/udev/rules.d/70-persistent-net.rules",
            'SUBSYSTEM=="net", ACTION=="add", ATTR{address}=="52:54:00:12:34:56", NAME="eth0"\n')
    f.write("/var/lib/dhcp/dhclient.eth0.leases", "lease {}\n")
    f.write("/etc/ssh/ssh_host_ed25519_key", "KEY", 0o600)
    f.write("/etc/passwd", f"root:x:0:0:root:/root:/bin/bash\n{USER}:x:1000:1000::/home/{USER}:/bin/bash\n")
    f.write("/etc/shadow", f"root:{HASH}:19000:0:99999:7:::\n{USER}:!:19000:0:99999:7:::\n", 0o640)
    f.mkdir(f"/home/{USER}")
    f.write("/etc/sudoers.d/waagent", f"{USER} ALL=(ALL) NOPASSWD: ALL\n", 0o440)
    f.write("/root/.ssh/authorized_keys", f'command="echo Please login as the user {USER}" ssh-ed25519 AAAA\n')
    f.write("/etc/passwd-", f"{USER}:x:1000:1000::/home/{USER}:/bin/bash\n")
    f.write("/var/log/auth.log", f"sshd: Accepted publickey for {USER}\n")
    f.write("/etc/machine-id", "0123456789abcdef0123456789abcdef\n")
    f.tool("visudo", "echo '/etc/sudoers.d/waagent: syntax error' >&2; exit 1")
    f.tool("systemctl", "exit 3")
    return f


def test_the_debian_12_plan_makes_the_claims_written_here() -> None:
    assert [c.what.split(" (")[0] for c in claims()] == EXPECTED_CLAIMS


@pytest.mark.parametrize("i", range(len(EXPECTED_CLAIMS)), ids=EXPECTED_CLAIMS)
def test_each_claim_holds_on_a_clean_root_and_not_on_a_dirty_one(tmp_path: Path, i: int) -> None:
    c = claims()[i]
    good = clean(tmp_path / "clean").guest(replace=REPLACED).run(c.test)
    assert good.returncode == 0, (c.what, c.test, good.stderr)
    bad = dirty(tmp_path / "dirty").guest(replace=REPLACED).run(c.test)
    assert bad.returncode != 0, (c.what, c.test, bad.stdout)


@pytest.mark.parametrize("what", [f"no waagent sudoers line for {USER}", f"no account-file backup names {USER}"])
def test_a_claim_about_a_file_that_cannot_be_read_is_false(tmp_path: Path, what: str) -> None:
    f = clean(tmp_path / "r")
    f.mkdir("/etc/sudoers.d/waagent")  # grep: "Is a directory" (exit 2): it proves nothing
    (f.path("/etc/sudoers.d/waagent") / "x").write_text("")
    f.path("/etc/passwd-").unlink()
    f.mkdir("/etc/passwd-")
    c = next(c for c in claims() if c.what == what)
    res = f.guest(replace=REPLACED).run(c.test)
    assert res.returncode != 0, (c.test, res.stdout, res.stderr)


def test_the_user_is_not_gone_when_getent_itself_fails(tmp_path: Path) -> None:
    f = clean(tmp_path / "r")
    c = next(c for c in claims() if c.what == f"user {USER} is gone")
    f.tool("getent", "echo 'getent: cannot open database' >&2; exit 1")
    assert f.guest(replace=REPLACED).run(c.test).returncode != 0


def test_the_script_vouches_for_nothing_when_not_root(tmp_path: Path) -> None:
    """A guest whose sudo did not take effect: the script says so and deprovision() stops with an error."""
    f = dirty(tmp_path / "r")
    f.path(f"/home/{USER}").chmod(0o755)
    f.write("/var/lib/waagent/ovf-env.xml", "<Environment/>")
    f.path("/var/lib/waagent").chmod(0o755)
    with pytest.raises(BuildError, match="other than root"):
        deprovision(f.guest(replace=REPLACED, uid=65534), distros.get("debian-12"), USER)
