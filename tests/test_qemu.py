"""The QEMU argv builder (pure) and the accelerator probe (bounded, cached)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import textwrap
import uuid
from pathlib import Path

import pytest

from imagekit.core.errors import InputError
from imagekit.vm import qemu
from imagekit.vm.qemu import Accel, NetSpec, VMSpec, build_argv

REPO = Path(__file__).resolve().parent.parent


def _spec(**kw: object) -> VMSpec:
    base: dict[str, object] = dict(name="t1", accel=Accel.TCG, console_log=Path("/nonexistent/run/console.log"),
                                   qmp_socket=Path("/nonexistent/p/qmp.sock"))
    base.update(kw)
    return VMSpec(**base)  # type: ignore[arg-type]


def _after(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


def _devices(argv: list[str]) -> list[str]:
    return _after(argv, "-device")


def test_tcg_identity_is_azure() -> None:
    u = uuid.UUID("12345678-1234-5678-9abc-def012345678")
    argv = build_argv(_spec(vm_uuid=u))
    assert _after(argv, "-accel") == ["tcg"]
    assert _after(argv, "-cpu") == ["max,hypervisor=off"]
    smbios = _after(argv, "-smbios")
    assert smbios == [
        "type=1,manufacturer=Microsoft Corporation,product=Virtual Machine,version=Hyper-V UEFI Release v4.1,"
        f"uuid={u}",
        "type=3,manufacturer=Microsoft Corporation,asset=7783-7084-3265-9085-8269-3286-77",
    ]
    assert _after(argv, "-uuid") == [str(u)]
    for flag in ("-nodefaults", "-no-user-config"):
        assert flag in argv
    assert _after(argv, "-display") == ["none"]
    assert _after(argv, "-machine") == ["pc"]


def test_kvm_gets_host_cpu_with_hyperv_enlightenments() -> None:
    argv = build_argv(_spec(accel=Accel.KVM))
    assert _after(argv, "-accel") == ["kvm"]
    (cpu,) = _after(argv, "-cpu")
    flags = cpu.split(",")
    assert flags[0] == "host"
    for f in ("hv-relaxed", "hv-vapic", "hv-time", "hv-vpindex", "hv-synic", "hv-stimer"):
        assert f in flags
    assert "hypervisor=off" not in flags


def test_each_spec_gets_a_fresh_uuid() -> None:
    assert _spec().vm_uuid != _spec().vm_uuid


def test_devices_and_disks() -> None:
    argv = build_argv(_spec(os_disk=Path("/d/os.qcow2"), iso=Path("/d/ovf.iso"), resource_disk=Path("/d/res.raw")))
    drives = _after(argv, "-drive")
    devs = _devices(argv)
    assert "virtio-scsi-pci,id=scsi0" in devs
    os_drive = next(d for d in drives if "id=osdisk" in d)
    assert "file=/d/os.qcow2" in os_drive and "format=qcow2" in os_drive
    assert "scsi-hd,drive=osdisk,bus=scsi0.0,channel=0,scsi-id=0,lun=0,bootindex=0" in devs
    res = next(d for d in devs if "drive=resdisk" in d)
    assert res.startswith("scsi-hd,") and "serial=RESOURCEDISK" in res and "lun=1" in res
    iso_drive = next(d for d in drives if "id=ovfiso" in d)
    assert "media=cdrom" in iso_drive and "readonly=on" in iso_drive
    iso_dev = next(d for d in devs if "drive=ovfiso" in d)
    # The DVD must be an IDE CD-ROM (/dev/sr0); a virtio disk could be taken for it by waagent.
    assert iso_dev.startswith("ide-cd,")
    assert not any("virtio-blk" in d for d in devs)
    assert "virtio-rng-pci,rng=rng0" in devs
    assert "pvpanic" in devs
    assert qemu.RESOURCE_DISK_GUEST_PATH == "/dev/disk/by-id/scsi-0QEMU_QEMU_HARDDISK_RESOURCEDISK"


def test_console_and_qmp() -> None:
    argv = build_argv(_spec(console_log=Path("/r/console.log"), qmp_socket=Path("/p/qmp.sock")))
    chardevs = _after(argv, "-chardev")
    assert "file,id=console,path=/r/console.log" in chardevs
    assert _after(argv, "-serial") == ["chardev:console"]
    assert "socket,id=qmp,path=/p/qmp.sock,server=on,wait=off" in chardevs
    assert _after(argv, "-mon") == ["chardev=qmp,mode=control"]


def test_commas_in_paths_are_escaped() -> None:
    argv = build_argv(_spec(os_disk=Path("/a,b/os.qcow2"), console_log=Path("/c,d/console.log")))
    assert any("file=/a,,b/os.qcow2," in d for d in _after(argv, "-drive"))
    assert "file,id=console,path=/c,,d/console.log" in _after(argv, "-chardev")


def test_network_layout() -> None:
    net = NetSpec(mac="00:0d:3a:01:02:03", ssh_port=2345, hostname="vm1")
    argv = build_argv(_spec(net=net))
    (netdev,) = _after(argv, "-netdev")
    opts = netdev.split(",")
    assert opts[0] == "user"
    assert "net=168.63.129.0/24" in opts
    # slirp's host address is the guest's default gateway: waagent's route check wants 168.63.129.16.
    assert "host=168.63.129.16" in opts
    assert "dhcpstart=168.63.129.100" in opts
    assert "hostfwd=tcp:127.0.0.1:2345-:22" in opts
    assert "hostname=vm1" in opts
    assert "ipv6=off" in opts
    # restrict=on would forbid the guest's connections to the host address, i.e. the WireServer.
    assert not any(o.startswith("restrict") for o in opts)
    assert "virtio-net-pci,netdev=n0,mac=00:0d:3a:01:02:03" in _devices(argv)
    # IMDS must lie outside slirp's network, or slirp would map it to loopback like the gateway.
    import ipaddress
    assert ipaddress.ip_address(qemu.IMDS_IP) not in ipaddress.ip_network(qemu.GUEST_NET)
    assert ipaddress.ip_address(qemu.WIRESERVER_IP) in ipaddress.ip_network(qemu.GUEST_NET)


def test_no_network_no_netdev() -> None:
    assert "-netdev" not in build_argv(_spec())


def test_builder_is_pure(tmp_path: Path) -> None:
    spec = _spec(os_disk=tmp_path / "missing.qcow2", console_log=tmp_path / "c.log", qmp_socket=tmp_path / "q")
    assert build_argv(spec) == build_argv(spec)
    assert list(tmp_path.iterdir()) == []


def test_random_mac_is_unicast_microsoft_oui() -> None:
    macs = {qemu.random_mac() for _ in range(20)}
    assert len(macs) > 1
    for m in macs:
        NetSpec(mac=m)
        assert m.startswith("00:0d:3a:")


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"memory_mib": 64}, "memory size 64"),
        ({"cpus": 0}, "vCPU count 0"),
        ({"name": "bad name"}, "VM name"),
        ({"os_disk_format": "vmdk"}, "OS disk format"),
        ({"kernel_append": "console=ttyS0"}, "needs a kernel"),
    ],
)
def test_bad_spec_is_refused(kw: dict[str, object], needle: str) -> None:
    with pytest.raises(InputError, match=needle):
        _spec(**kw)


@pytest.mark.parametrize(("mac", "needle"), [("00:0D:3A:01:02:03", "lower-case"), ("01:00:00:00:00:01", "multicast"),
                                             ("00:0d:3a:01:02", "lower-case")])
def test_bad_mac_is_refused(mac: str, needle: str) -> None:
    with pytest.raises(InputError, match=needle):
        NetSpec(mac=mac)


def test_bad_ssh_port_is_refused() -> None:
    with pytest.raises(InputError, match="SSH forward port 22"):
        NetSpec(ssh_port=22)


# --- the probe ------------------------------------------------------------------------------------


@pytest.mark.skipif(not (shutil.which("as") and shutil.which("ld")), reason="binutils (as, ld) not installed")
def test_embedded_payload_matches_its_source(tmp_path: Path) -> None:
    src = REPO / "scripts" / "kvm-probe.S"
    subprocess.run(["as", "--64", "-o", tmp_path / "p.o", src], check=True)
    subprocess.run(["ld", "-m", "elf_x86_64", "-Ttext=0x100000", "--oformat=binary", "-o", tmp_path / "p.bin",
                    tmp_path / "p.o"], check=True)
    assert (tmp_path / "p.bin").read_bytes() == qemu.PROBE_PAYLOAD


def _fake_qemu(tmp_path: Path, body: str) -> str:
    script = tmp_path / "fake-qemu"
    script.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("IMAGEKIT_CACHE", str(d))
    monkeypatch.delenv("IMAGEKIT_ACCEL", raising=False)
    return d


def test_probe_hang_is_bounded_and_killed(tmp_path: Path, cache: Path) -> None:
    marker = f"sleep 3{os.getpid()}.5"  # unique, so pgrep finds only this test's process
    fake = _fake_qemu(tmp_path, f"{marker}\n")
    result = qemu.probe_accel(qemu=fake, use_cache=False, timeout=1.5)
    assert result.accel is Accel.TCG
    assert "did not finish" in result.reason
    alive = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True)
    assert alive.stdout.strip() == "", "the hung probe guest was left running"


@pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="no accessible /dev/kvm")
def test_probe_accepts_kvm_only_with_marker_and_exit_status(tmp_path: Path, cache: Path) -> None:
    # A guest that prints the marker on its console and exits through isa-debug-exit: KVM works.
    ok = _fake_qemu(tmp_path, """
        while [ $# -gt 0 ]; do
          case "$1" in file,id=console,path=*) console="${1#file,id=console,path=}";; esac; shift
        done
        echo IMAGEKIT-LONG-MODE-OK > "$console"; exit 3
    """)
    assert qemu.probe_accel(qemu=ok, use_cache=False).accel is Accel.KVM
    bad = _fake_qemu(tmp_path, "echo 'qemu: error: failed to set MSR 0x10a' >&2; exit 1\n")
    res = qemu.probe_accel(qemu=bad, use_cache=False)
    assert res.accel is Accel.TCG and "failed to set MSR" in res.reason


def test_probe_on_this_host_is_cached(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = qemu.probe_accel()
    assert not first.cached
    if os.environ.get("IMAGEKIT_TEST_KVM_WORKS") != "1":
        # On this machine kind KVM guests hang: the probe must settle on TCG.
        assert first.accel is Accel.TCG, first.reason

    def boom(*a: object, **k: object) -> tuple[bool, str]:
        raise AssertionError("the probe ran again instead of using the cache")

    monkeypatch.setattr(qemu, "_run_probe", boom)
    second = qemu.probe_accel()
    assert second.cached and second.accel is first.accel and second.reason == first.reason
    assert (cache / "accel-probe.json").is_file()


def test_accel_override(monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    monkeypatch.setenv("IMAGEKIT_ACCEL", "tcg")
    assert qemu.probe_accel().accel is Accel.TCG
    monkeypatch.setenv("IMAGEKIT_ACCEL", "xen")
    with pytest.raises(InputError, match="allowed: kvm, tcg"):
        qemu.probe_accel()


# --- the vCPU count chosen from the host ------------------------------------------------------------------


def _fake_proc(root: Path, procs: dict[int, list[str]]) -> Path:
    for pid, argv in procs.items():
        (root / str(pid)).mkdir(parents=True)
        (root / str(pid) / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    return root


def test_running_imagekit_vms_are_counted_by_their_vcpus_and_nothing_else(tmp_path: Path) -> None:
    proc = _fake_proc(tmp_path, {
        10: ["qemu-system-x86_64", "-name", "a,process=ik-a", "-smp", "2"],
        11: ["/usr/bin/qemu-system-x86_64", "-name", "b,process=ik-b", "-smp", "1"],
        12: ["qemu-system-x86_64", "-name", "c,process=ik-c"],  # no -smp: QEMU's default of one
        13: ["qemu-system-x86_64", "-name", "someone-else", "-smp", "8"],  # not ours
        14: ["python3", "-c", "print('process=ik-x -smp 4')"],  # names ours but is no QEMU
    })
    (tmp_path / "self").mkdir()  # not a pid: ignored
    assert qemu.vcpus_of_running_vms(proc) == 4


@pytest.mark.parametrize(("cores", "busy", "expect"), [(2, 0, 2), (2, 1, 1), (2, 2, 1), (1, 0, 1), (8, 5, 2),
                                                        (8, 7, 1), (4, 9, 1)])
def test_two_vcpus_only_where_two_cores_are_free(cores: int, busy: int, expect: int,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IMAGEKIT_CPUS", raising=False)
    assert qemu.choose_cpus(cores, busy) == expect


def test_imagekit_cpus_overrides_the_choice_and_a_bad_value_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEKIT_CPUS", "3")
    assert qemu.choose_cpus(2, 0) == 3
    for bad in ("0", "two", "-1", "65"):
        monkeypatch.setenv("IMAGEKIT_CPUS", bad)
        with pytest.raises(InputError, match=r"bad IMAGEKIT_CPUS .*allowed: a vCPU count from 1 to 64"):
            qemu.choose_cpus(2, 0)
    monkeypatch.delenv("IMAGEKIT_CPUS")
    assert qemu.choose_cpus(2, 0) == 2
