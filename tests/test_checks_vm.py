"""The checks against real guests: each agent's own resource-disk code runs under QEMU (waagent through
the /run shim, cloud-init through CustomData) and the resource-disk, swap and provisioning checks pass
for real; the undo leaves nothing of the set-up outside /run. Slow: boots QEMU (TCG here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagekit.checkrun import CheckOutcome, check_provisioned
from imagekit.checks import (
    CheckContext,
    Status,
    activate_resource_disk,
    catalogue,
    plan_for,
    resource_disk_custom_data,
    summary_table,
    undo_test_setup,
)
from imagekit.config import distros
from imagekit.config.profile import ProvisioningProfile
from imagekit.provision.resource_setup import RESOURCE_DISK, SHIM_DIR

pytestmark = [pytest.mark.vm, pytest.mark.timeout(3600)]

PASSWORD = "Ik-Check-Passw0rd!"
MUST_PASS = (
    "resource-disk.mounted", "swap.resource-disk", "swap.not-on-os-disk",
    "provisioning.user", "provisioning.password-auth", "provisioning.sudo", "provisioning.marker",
    "provisioning.ovf-redacted", "provisioning.ready-reported", "provisioning.agent-running",
)


def _by_id(outcome: CheckOutcome) -> dict[str, tuple[Status, str, str]]:
    print(summary_table(outcome.runs, colour=False))
    return {r.check.id: (r.result.status, r.result.summary, r.result.evidence) for r in outcome.runs}


def _assert_passed(results: dict[str, tuple[Status, str, str]], ids: tuple[str, ...]) -> None:
    bad = {cid: (results[cid][1], results[cid][2][-1500:]) for cid in ids if results[cid][0] is not Status.PASS}
    assert bad == {}
    crashed = {cid: r[1] for cid, r in results.items() if r[0] is Status.ERROR}
    assert crashed == {}


def _assert_reports(outcome: CheckOutcome) -> None:
    for p in outcome.reports.values():
        assert p.stat().st_size > 0
        assert PASSWORD not in p.read_text()


def test_debian12_waagent_resource_disk_swap_file_and_provisioning(tmp_path: Path) -> None:
    from imagekit.provision.launch import provision

    d = distros.get("debian-12")
    # No OVF password: with one, waagent's sudoers asks for it and the harness's `sudo -n` cannot run as
    # root (the SSH guest has no sudo password support yet); the unit scenarios cover the redaction.
    with provision(d, workdir=tmp_path / "run") as pvm:
        outcome = check_provisioned(pvm, report_dir=tmp_path / "report")
        results = _by_id(outcome)
        _assert_passed(results, (*MUST_PASS, "resource-disk.readme"))
        assert "swapfile of 256 MiB is active" in results["swap.resource-disk"][1]
        assert "VMBus" in results["resource-disk.mounted"][2] and "bypassed" in results["resource-disk.mounted"][2]
        # waagent's own resource-disk code ran (its log lines), against the shim's answer.
        log = pvm.guest.run("grep -E 'imagekit test shim|Resource disk|Enabled .*swap' /var/log/waagent.log")
        assert "imagekit test shim: device_for_ide_port(1) -> sd" in log.stdout
        assert "is mounted at /mnt/resource with ext4" in log.stdout
        assert "no UserPassword element" in results["provisioning.ovf-redacted"][1]

        # Wrong on purpose, in this throwaway VM: a swap size larger than the 2 GiB resource disk. The agent
        # runs again (its own code) and the swap check must fail, with the agent's own log as evidence.
        changed = pvm.guest.run("sed -i 's/^ResourceDisk.SwapSizeMB=.*/ResourceDisk.SwapSizeMB=4096/' "
                                "/etc/waagent.conf && swapoff /mnt/resource/swapfile")
        assert changed.ok, changed.evidence()
        activate_resource_disk(pvm.guest, plan_for(d), timeout=600)
        ctx = CheckContext(guest=pvm.guest, distro=d, profile=pvm.profile, plan=plan_for(d))
        big = catalogue()["swap.resource-disk"].run(ctx)
        print(big.summary, big.evidence, sep="\n")
        assert big.status is Status.FAIL
        assert "SwapSizeMB=4096 does not fit on the resource disk (2048 MiB)" in big.summary
        assert "ResourceDisk.SwapSizeMB=4096" in big.evidence and "dd unsuccessful" in big.evidence

        # More ways to get an image wrong, made for real in this throwaway VM; each check must catch its own.
        def broken(setup: str, check_id: str) -> tuple[Status, str, str]:
            res = pvm.guest.run(setup)
            assert res.ok, res.evidence()
            r = catalogue()[check_id].run(CheckContext(guest=pvm.guest, distro=d, profile=pvm.profile))
            print(check_id, r.summary, sep=": ")
            return r.status, r.summary, r.evidence

        st, summary, ev = broken("dd if=/dev/zero of=/os-swap bs=1M count=32 status=none && chmod 600 /os-swap "
                                 "&& mkswap /os-swap >/dev/null && swapon /os-swap", "swap.not-on-os-disk")
        assert st is Status.FAIL and "active swap /os-swap (file) is on the OS disk /dev/sda" in summary, ev
        pvm.guest.run("swapoff /os-swap; rm -f /os-swap")
        st, summary, ev = broken(
            "useradd -m -p \"$(openssl passwd -6 leftover-pw)\" leftover && mkdir -p /home/leftover/.ssh && "
            "echo 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEu0leftoverkeyleftoverkeyleftoverkeyleft x@build' "
            "> /home/leftover/.ssh/authorized_keys", "standard.no-preexisting-users")
        assert st is Status.FAIL and "user leftover (uid=" in summary and "leftover has a password" in summary
        assert "leftover has SSH keys" in summary and "leftover-pw" not in ev and "$6$" not in ev
        st, summary, ev = broken("grep -rlis '^ *ClientAliveInterval' /etc/ssh/sshd_config /etc/ssh/sshd_config.d "
                                 "| xargs -r sed -i '/^ *[Cc]lient[Aa]live[Ii]nterval/d'",
                                 "standard.client-alive-interval")
        assert st is Status.FAIL and "ClientAliveInterval is 0 (0 means unset)" in summary, ev
        assert "no ClientAliveInterval line" in ev

        done = undo_test_setup(pvm.guest, d)
        state = pvm.guest.run(f"ls {SHIM_DIR}; ls /run/systemd/system/walinuxagent.service.d; cat /proc/swaps; "
                              "findmnt -n /mnt/resource; cat /etc/fstab")
        assert "swapoff /mnt/resource/swapfile" in done
        assert "/mnt/resource/swapfile" not in state.stdout
        assert "No such file" in state.stderr and "imagekit" not in state.stdout
        assert RESOURCE_DISK not in state.stdout
    _assert_reports(outcome)


@pytest.mark.parametrize("distro_id", ["debian-12-cloudinit", "debian-13-cloudinit"])
def test_cloudinit_resource_disk_and_swap_partition(tmp_path: Path, distro_id: str) -> None:
    """cloud-init 22.4 (Debian 12) and 25.1 (Debian 13)."""
    from imagekit.provision.launch import provision

    d = distros.get(distro_id)
    plan = plan_for(d, swap_percent=33)
    # With an OVF password and password login enabled: cloud-init's sudo rule stays NOPASSWD (so the
    # harness can still run as root), and the OVF copy it leaves must have the password redacted.
    profile = ProvisioningProfile.create(hostname=f"ik-{distro_id.split('-')[1]}ci", username="azureuser",
                                         password=PASSWORD, disable_password_auth=False,
                                         custom_data=resource_disk_custom_data(d, swap_percent=33))
    with provision(d, profile=profile, workdir=tmp_path / "run") as pvm:
        outcome = check_provisioned(pvm, plan=plan, report_dir=tmp_path / "report")
        results = _by_id(outcome)
        _assert_passed(results, MUST_PASS)
        assert "redacted as 'REDACTED'" in results["provisioning.ovf-redacted"][1]
        assert "PasswordAuthentication yes, as the OVF asks" in results["provisioning.password-auth"][1]
        assert results["resource-disk.readme"][0] is Status.SKIP
        assert "swap partition" in results["swap.resource-disk"][1]
        assert "device_aliases" in results["resource-disk.mounted"][2]
        before = pvm.guest.run("grep -c comment=cloudconfig /etc/fstab")
        assert int(before.stdout.strip() or 0) >= 2  # cloud-init wrote the mount and the swap line
        done = undo_test_setup(pvm.guest, d, plan)
        after = pvm.guest.run(f"grep -F {RESOURCE_DISK} /etc/fstab; cat /proc/swaps; findmnt -n /mnt")
        assert RESOURCE_DISK not in after.stdout and "partition" not in after.stdout
        assert any("removed from /etc/fstab" in x for x in done)
    _assert_reports(outcome)


def test_debian13_waagent_swap_disabled(tmp_path: Path) -> None:
    from imagekit.provision.launch import provision

    d = distros.get("debian-13")
    assert not d.swap_enabled
    with provision(d, workdir=tmp_path / "run") as pvm:
        outcome = check_provisioned(pvm, report_dir=tmp_path / "report")
        results = _by_id(outcome)
        _assert_passed(results, (*MUST_PASS, "resource-disk.readme"))
        assert "swap disabled" in results["swap.resource-disk"][1]
        undo_test_setup(pvm.guest, d)
    _assert_reports(outcome)
