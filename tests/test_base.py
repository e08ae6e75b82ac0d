"""Base images, the parts that run without a VM or a mirror: apt sources, the cache key and layout,
the disk writer (MBR, ext4 at an offset, GRUB's boot sector), and the root-tree configuration."""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from pathlib import Path

import pytest

from imagekit.base import (
    MIN_FREE_MIB,
    apt,
    cache,
    check_free_space,
    customize,
    disk,
    ensure_base,
    is_enospc,
    static_inputs,
)
from imagekit.base.inspect import open_image
from imagekit.config import distros
from imagekit.core.errors import BuildError, CommandError, InputError

BOOTSTRAP_IDS = ("debian-11", "debian-12", "debian-12-cloudinit", "debian-13", "debian-13-cloudinit")


# --- bad input -----------------------------------------------------------------------------------


def test_unknown_distro_names_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(InputError) as exc:
        ensure_base(distros.get("debian-99"), cache=tmp_path)
    msg = str(exc.value)
    assert "debian-99" in msg
    for known in BOOTSTRAP_IDS:
        assert known in msg
    assert not (tmp_path / "base").exists()


def test_too_little_free_space_is_refused_before_building(tmp_path: Path) -> None:
    with pytest.raises(BuildError) as exc:
        check_free_space(tmp_path, 1 << 40)
    assert "not enough free space" in str(exc.value) and str(tmp_path) in str(exc.value)
    assert MIN_FREE_MIB >= 2048


def test_enospc_is_recognised_in_errno_and_command_output() -> None:
    assert is_enospc(OSError(28, "No space left on device"))
    assert is_enospc(CommandError(["mkfs.ext4"], 1, "", "mkfs.ext4: Could not allocate block in ext2 filesystem"))
    assert is_enospc(CommandError(["mmdebstrap"], 1, "", "E: write error: No space left on device"))
    assert is_enospc(CommandError(["mmdebstrap"], 1, "", "E: You don't have enough free space in /x/"))
    assert not is_enospc(CommandError(["mmdebstrap"], 1, "", "E: Unable to locate package foo"))
    assert not is_enospc(OSError(13, "Permission denied"))


# --- apt sources --------------------------------------------------------------------------------

ONE_LINE = """
# comment
deb [arch=amd64 signed-by=/x.gpg] http://mirror.example/debian bookworm main contrib
deb http://security.example/debian-security bookworm-security main
deb https://packages.example/apt cloud-sdk-bookworm main
deb-src http://mirror.example/debian bookworm main
"""

DEB822 = """Types: deb
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://security.example/debian-security
Suites: bookworm-security
Components: main

Types: deb
URIs: https://third.example/node
Suites: nodistro
Components: main
"""


def test_mirrors_are_read_from_one_line_and_deb822_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IMAGEKIT_DEBIAN_MIRROR", raising=False)
    monkeypatch.delenv("IMAGEKIT_DEBIAN_SECURITY_MIRROR", raising=False)
    assert apt.choose_mirrors(apt.parse_one_line(ONE_LINE)) == apt.Mirrors(
        "http://mirror.example/debian", "http://security.example/debian-security")
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(DEB822)
    (tmp_path / "sources.list.d" / "other.list").write_text("deb https://x.example/apt stable-x main\n")
    assert apt.mirrors(tmp_path) == apt.Mirrors(
        "http://mirror.example/debian", "http://security.example/debian-security")
    monkeypatch.setenv("IMAGEKIT_DEBIAN_MIRROR", "http://env.example/debian")
    monkeypatch.setenv("IMAGEKIT_DEBIAN_SECURITY_MIRROR", "")
    assert apt.mirrors(tmp_path) == apt.Mirrors("http://env.example/debian", "")


def test_no_debian_mirror_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IMAGEKIT_DEBIAN_MIRROR", raising=False)
    (tmp_path / "sources.list").write_text("deb https://packages.example/apt cloud-sdk main\n")
    with pytest.raises(Exception, match="IMAGEKIT_DEBIAN_MIRROR"):
        apt.mirrors(tmp_path)


def test_image_sources_cover_updates_and_security() -> None:
    srcs = apt.sources_for("trixie", ("main",), apt.Mirrors("http://m/debian", "http://s/debian-security"))
    assert [s.line() for s in srcs] == [
        "deb http://m/debian trixie main",
        "deb http://m/debian trixie-updates main",
        "deb http://s/debian-security trixie-security main",
    ]
    assert [s.required for s in srcs] == [True, False, False]
    assert srcs[0].release_url() == "http://m/debian/dists/trixie/InRelease"


# --- cache key and layout -------------------------------------------------------------------------


def test_cache_key_changes_with_every_input() -> None:
    d = distros.get("debian-12")
    base = static_inputs(d)
    key = cache.compute_key({**base, "archive": {"bookworm": "a"}})
    assert key == cache.compute_key({**static_inputs(d), "archive": {"bookworm": "a"}})
    changed = [
        {**base, "archive": {"bookworm": "b"}},
        {**static_inputs(dataclasses.replace(d, disk_size_mib=4096)), "archive": {"bookworm": "a"}},
        {**static_inputs(dataclasses.replace(d, waagent_conf={**d.waagent_conf, "Logs.Verbose": "y"})),
         "archive": {"bookworm": "a"}},
        {**base, "toolkit": "9.9.9", "archive": {"bookworm": "a"}},
        {**base, "recipe": "0" * 64, "archive": {"bookworm": "a"}},
    ]
    keys = {cache.compute_key(c) for c in changed}
    assert key not in keys and len(keys) == len(changed)


def test_publish_is_all_or_nothing_and_stale_builds_are_removed(tmp_path: Path) -> None:
    root = tmp_path / "base"
    with cache.distro_lock(root, "x") as ddir:
        with pytest.raises(RuntimeError), cache.build_dir(ddir) as b:
            (b / "out").mkdir()
            (b / "out" / cache.IMAGE_NAME).write_bytes(b"half")
            raise RuntimeError("interrupted")
        assert not list(ddir.glob(".build-*"))
        assert cache.entries(root, "x") == []
        stale = ddir / ".build-killed"
        (stale / "work").mkdir(parents=True)
        cache.remove_stale_builds(ddir)
        assert not stale.exists()
        with cache.build_dir(ddir) as b:
            out = b / "out"
            out.mkdir()
            (out / cache.IMAGE_NAME).write_bytes(b"img")
            cache.write_json_atomic(out / cache.META_NAME, {"distro_id": "x", "key": "k", "created": "1"})
            cache.publish(out, cache.entry_dir(root, "x", "k" * 64))
    (entry, meta), = cache.entries(root, "x")
    assert entry.name == "k" * cache.KEY_LEN and meta["key"] == "k"
    assert [p.name for p in (root / "x").iterdir() if p.name.startswith(".build")] == []


# --- disk writer ----------------------------------------------------------------------------------


def _fake_grub(tmp_path: Path, core_sectors: int = 5) -> tuple[Path, Path]:
    boot = bytearray(512)
    boot[0x66:0x68] = b"\xeb\x05"  # the floppy check jump that grub-bios-setup NOPs out
    boot[0x1B8:0x1FE] = b"\xaa" * (0x1FE - 0x1B8)  # junk where the partition table goes
    boot[510:512] = b"\x55\xaa"
    core = bytearray(core_sectors * 512 - 100)
    struct.pack_into("<QHH", core, 512 - 12, 2, core_sectors - 1, 0x820)
    core[600:604] = b"CORE"
    (tmp_path / "boot.img").write_bytes(bytes(boot))
    (tmp_path / "core.img").write_bytes(bytes(core))
    return tmp_path / "boot.img", tmp_path / "core.img"


def test_raw_disk_has_one_partition_at_1mib_a_whole_mib_size_and_is_sparse(tmp_path: Path) -> None:
    raw = tmp_path / "d.raw"
    disk.create_raw(raw, 2048)
    assert raw.stat().st_size == 2048 * disk.MIB
    assert raw.stat().st_blocks * 512 < disk.MIB
    (p,) = disk.partitions(raw)
    assert p.start_sector == 2048 and p.type == "83" and p.bootable
    assert (p.start_sector + p.size_sectors) * 512 == 2048 * disk.MIB


def test_grub_boot_sector_keeps_the_partition_table_and_points_at_core(tmp_path: Path) -> None:
    raw = tmp_path / "d.raw"
    disk.create_raw(raw, 8)
    before = raw.read_bytes()[:512]
    boot, core = _fake_grub(tmp_path)
    disk.install_grub_bios(raw, boot, core)
    data = raw.read_bytes()
    mbr = data[:512]
    assert mbr[0x1B8:0x1FE] == before[0x1B8:0x1FE]  # signature and partition table untouched
    assert mbr[510:512] == b"\x55\xaa"
    assert struct.unpack_from("<Q", mbr, 0x5C)[0] == 1 and mbr[0x64] == 0xFF
    assert mbr[0x66:0x68] == b"\x90\x90"
    assert data[512 + 600:512 + 604] == b"CORE"
    assert disk.partitions(raw)[0].start_sector == 2048


def test_grub_refuses_a_core_image_without_the_expected_block_list(tmp_path: Path) -> None:
    raw = tmp_path / "d.raw"
    disk.create_raw(raw, 8)
    boot, core = _fake_grub(tmp_path)
    bad = bytearray(core.read_bytes())
    struct.pack_into("<QHH", bad, 512 - 12, 7, 1, 0x820)
    core.write_bytes(bytes(bad))
    before = raw.read_bytes()
    with pytest.raises(BuildError, match="block list"):
        disk.install_grub_bios(raw, boot, core)
    assert raw.read_bytes() == before


def test_ext4_is_made_from_a_directory_at_the_partition_offset_without_mounting(tmp_path: Path) -> None:
    src = tmp_path / "root"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "hello").write_text("hi there\n")
    os.symlink("hello", src / "etc" / "link")
    raw = tmp_path / "d.raw"
    disk.create_raw(raw, 64)
    (p,) = disk.partitions(raw)
    disk.make_ext4(raw, p, src, uuid="0b8b7c7e-8a3c-4b55-9a0e-0f2a8d1c3e11", label="rootfs")
    qcow = tmp_path / "d.qcow2"
    disk.to_qcow2(raw, qcow)
    assert disk.qemu_img_info(qcow)["virtual-size"] == 64 * disk.MIB
    with open_image(qcow, tmp_path) as img:
        assert img.read_text("/etc/hello") == "hi there\n"
        assert set(img.listdir("/etc")) == {"hello", "link"}
        assert img.exists("/etc/hello") and not img.exists("/etc/absent")
    assert not list(tmp_path.glob("imagekit-inspect-*"))


# --- root tree configuration ---------------------------------------------------------------------


DEBIAN_WAAGENT_UNIT = """[Unit]
Description=Microsft Azure Linux Agent
After=multi-user.target
ConditionVirtualization=microsoft

[Service]
ExecStart=/usr/sbin/waagent -daemon

[Install]
WantedBy=multi-user.target
"""


def _fake_root(tmp_path: Path, *, cloud_init: bool) -> Path:
    root = tmp_path / "root"
    for d in ("etc/ssh/sshd_config.d", "var/lib/dpkg/info", "var/lib/dbus", "root", "home", "etc/cloud"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "etc/ssh/sshd_config").write_text("Include /etc/ssh/sshd_config.d/*.conf\nPermitRootLogin yes\n")
    for k in ("rsa", "ed25519"):
        (root / f"etc/ssh/ssh_host_{k}_key").write_text("PRIVATE")
        (root / f"etc/ssh/ssh_host_{k}_key.pub").write_text("PUBLIC")
    pkgs = ["waagent", "eject"] + (["cloud-init", "cloud-guest-utils"] if cloud_init else [])
    units = root / "lib/systemd/system"
    units.mkdir(parents=True)
    # Debian 12's own units (waagent 2.7.3, ifupdown 0.8.41), as the packages ship them.
    (units / "walinuxagent.service").write_text(DEBIAN_WAAGENT_UNIT)
    (units / "ifupdown-wait-online.service").write_text("[Unit]\nBefore=network-online.target\n[Service]\n"
                                                         "Type=oneshot\nExecStart=/lib/ifupdown/wait-online.sh\n")
    (root / "etc/default").mkdir(parents=True)
    (root / "etc/default/networking").write_text("# Method to wait for the network\n#WAIT_ONLINE_METHOD=ifup\n")
    for p in pkgs:
        (root / f"var/lib/dpkg/info/{p}.list").write_text("")
    (root / "etc/waagent.conf").write_text(
        "Provisioning.Agent=cloud-init\n# AutoUpdate.Enabled=n\nResourceDisk.Format=y\nLogs.Verbose=n\n")
    (root / "etc/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    (root / "var/lib/dbus/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    (root / "etc/hostname").write_text("buildhost\n")
    (root / "etc/resolv.conf").write_text("nameserver 10.1.2.3\n")
    (root / "etc/shadow").write_text("root:$6$salt$hash:19000:0:99999:7:::\nmessagebus:!*:19000::::::\n")
    (root / "root/.bash_history").write_text("secret command\n")
    return root


def test_waagent_conf_values_are_set_from_the_table() -> None:
    text = "Provisioning.Agent=cloud-init\n# AutoUpdate.Enabled=n\nLogs.Verbose=n\n"
    out = customize.apply_waagent_conf(text, {"Provisioning.Agent": "waagent", "AutoUpdate.Enabled": "y",
                                              "ResourceDisk.SwapSizeMB": "256"})
    conf = customize.read_waagent_conf(out)
    assert conf == {"Provisioning.Agent": "waagent", "AutoUpdate.Enabled": "y", "Logs.Verbose": "n",
                    "ResourceDisk.SwapSizeMB": "256"}
    assert customize.apply_waagent_conf(out, {"Provisioning.Agent": "waagent"}) == out


@pytest.mark.parametrize("distro_id", ["debian-12", "debian-12-cloudinit"])
def test_root_tree_is_configured_from_the_table(tmp_path: Path, distro_id: str) -> None:
    d = distros.get(distro_id)
    cloud = d.agent is distros.Agent.CLOUD_INIT
    root = _fake_root(tmp_path, cloud_init=cloud)
    customize.configure_agent(root, d)
    customize.configure_ssh(root, d)
    customize.configure_network(root, d)
    customize.scrub_identity(root)
    conf = customize.read_waagent_conf((root / "etc/waagent.conf").read_text())
    for k, v in d.waagent_conf.items():
        assert conf[k] == v
    assert not list((root / "etc/ssh").glob("ssh_host_*"))
    dropin = (root / "etc/ssh/sshd_config.d/50-azure.conf").read_text()
    assert f"ClientAliveInterval {d.ssh.client_alive_interval}\n" in dropin
    assert f"PermitRootLogin {d.ssh.permit_root_login}\n" in dropin
    unit = (root / "etc/systemd/system" / customize.HOSTKEY_UNIT).read_text()
    assert "Before=ssh.service" in unit and "walinuxagent.service" in unit
    if cloud:
        assert "ExecStart=/usr/bin/ssh-keygen -A\n" in unit and "ConditionPathExistsGlob" not in unit
    else:
        # waagent replaces every host key while provisioning: first boot makes one fast key, only if none.
        assert "ExecStart=/usr/bin/ssh-keygen -q -N '' -t ed25519 -f /etc/ssh/ssh_host_ed25519_key\n" in unit
        assert "ConditionPathExistsGlob=!/etc/ssh/ssh_host_*_key\n" in unit and "ssh-keygen -A" not in unit
    eth0 = root / "etc/network/interfaces.d/eth0"
    if cloud:
        assert not eth0.exists()  # cloud-init writes its own eth0 stanza; two would make ifup fail
        ci = json.loads((root / "etc/cloud/cloud.cfg.d/90_azure_datasource.cfg").read_text().split("\n", 1)[1])
        assert ci["datasource_list"] == list(d.cloud_init["datasource_list"])
    else:
        assert "iface eth0 inet dhcp" in eth0.read_text()
        assert (root / "etc/default/networking").read_text().splitlines()[-1] == "WAIT_ONLINE_METHOD=route"
        link = root / "etc/systemd/system/network-online.target.wants" / customize.WAIT_ONLINE_UNIT
        assert os.readlink(link) == f"/lib/systemd/system/{customize.WAIT_ONLINE_UNIT}"
        agent = (root / "etc/systemd/system/walinuxagent.service").read_text()
        assert "After=network-online.target ssh.service\nWants=network-online.target\n" in agent
        assert "multi-user.target\n" in agent.split("[Install]")[1] and "After=multi-user" not in agent
    assert (root / "etc/machine-id").read_text() == ""
    assert not (root / "var/lib/dbus/machine-id").exists()
    assert (root / "etc/hostname").read_text() == "localhost\n"
    assert (root / "etc/resolv.conf").read_text() == ""
    assert (root / "etc/shadow").read_text().startswith("root:*:")
    assert not (root / "root/.bash_history").exists()
    names = [p.name for p in root.rglob("*")]
    assert not [n for n in names if "imagekit" in n.lower()]


def test_a_user_password_in_the_tree_is_refused(tmp_path: Path) -> None:
    root = _fake_root(tmp_path, cloud_init=False)
    (root / "etc/shadow").write_text("root:*:1::::::\nbob:$6$x$y:1::::::\n")
    with pytest.raises(BuildError, match="bob"):
        customize.scrub_identity(root)


def test_missing_agent_package_is_refused(tmp_path: Path) -> None:
    root = _fake_root(tmp_path, cloud_init=False)
    with pytest.raises(BuildError, match="cloud-init"):
        customize.configure_agent(root, distros.get("debian-12-cloudinit"))


@pytest.mark.parametrize("distro_id", BOOTSTRAP_IDS)
def test_debian_command_line_has_no_rootdelay_and_names_the_root(distro_id: str) -> None:
    d = distros.get(distro_id)
    line = customize.kernel_cmdline(d, "U")
    assert line.startswith("root=UUID=U ro ")
    assert "rootdelay" not in line and "console=ttyS0,115200n8" in line and "net.ifnames=0" in line


def test_a_security_archive_without_its_packages_is_recognised() -> None:
    from imagekit.base.bootstrap import _unfetchable_optional

    srcs = apt.sources_for("bullseye", ("main",), apt.Mirrors("http://m/debian", "http://s/debian-security"))
    err = CommandError(["mmdebstrap"], 25, "", "E: Failed to fetch http://s/debian-security/pool/updates/main/l/"
                       "linux/x.deb  404  Not Found [IP: 1.2.3.4 80]\n")
    assert _unfetchable_optional(err, srcs) == [srcs[2]]
    main_404 = CommandError(["mmdebstrap"], 25, "",
                            "E: Failed to fetch http://m/debian/pool/main/x.deb  404  Not Found")
    assert _unfetchable_optional(main_404, srcs) == []


def test_prune_keeps_the_newest_and_any_image_in_use(tmp_path: Path) -> None:
    from imagekit.base import prune

    root = tmp_path / "base"
    for i in range(3):
        e = cache.entry_dir(root, "x", f"{i}" * 64)
        e.mkdir(parents=True)
        (e / cache.IMAGE_NAME).write_bytes(b"img")
        meta = {"distro_id": "x", "key": f"{i}" * 64, "created": f"2026-0{i + 1}"}
        cache.write_json_atomic(e / cache.META_NAME, meta)
    held = cache.entry_dir(root, "x", "0" * 64) / cache.IMAGE_NAME
    with held.open("rb"):
        removed = prune("x", cache=tmp_path)
    assert [p.name for p in removed] == ["1" * cache.KEY_LEN]
    assert sorted(e.name for e, _ in cache.entries(root, "x")) == ["0" * cache.KEY_LEN, "2" * cache.KEY_LEN]


def test_unreachable_mirror_falls_back_to_an_image_built_from_the_same_inputs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from imagekit.core.errors import HostError

    def offline(sources: list[apt.AptSource]) -> tuple[dict[str, str], list[apt.AptSource]]:
        raise HostError("cannot reach the Debian mirror (test)")

    monkeypatch.setenv("IMAGEKIT_DEBIAN_MIRROR", "http://mirror.invalid/debian")
    monkeypatch.setattr(apt, "archive_fingerprint", offline)
    with pytest.raises(HostError, match="cannot reach"):
        ensure_base(distros.get("debian-12"), cache=tmp_path)  # nothing cached: the error stands
    d = distros.get("debian-12")
    entry = cache.entry_dir(tmp_path / "base", d.id, "e" * 64)
    entry.mkdir(parents=True)
    (entry / cache.IMAGE_NAME).write_bytes(b"img")
    cache.write_json_atomic(entry / cache.META_NAME, {
        "distro_id": d.id, "key": "e" * 64, "static_key": cache.compute_key(static_inputs(d)),
        "created": "2026-11-22T00:00:00+00:00", "kernel": "6.1.0-x", "packages": {"waagent": "1"}})
    img = ensure_base(distros.get("debian-12"), cache=tmp_path)
    assert img.cached and img.path == entry / cache.IMAGE_NAME and img.kernel == "6.1.0-x"


def test_agent_unit_waits_for_the_network_and_sshd_not_the_whole_boot(tmp_path: Path) -> None:
    text = customize.agent_unit_override(DEBIAN_WAAGENT_UNIT)
    assert text is not None
    unit = text.split("[Service]")[0]
    assert "\nAfter=network-online.target ssh.service\nWants=network-online.target\n" in unit
    assert not [ln for ln in unit.splitlines() if not ln.startswith("#") and "multi-user.target" in ln]
    # Everything else as the package ships it.
    assert text.endswith(DEBIAN_WAAGENT_UNIT.replace("After=multi-user.target\n",
                                                     "After=network-online.target ssh.service\n"
                                                     "Wants=network-online.target\n"))
    # Other orderings on the same line are kept; a unit not ordered after multi-user.target is not rewritten.
    both = customize.agent_unit_override("[Unit]\nAfter=multi-user.target cloud-init.service\n[Service]\nExecStart=x\n")
    assert both is not None and "After=network-online.target ssh.service cloud-init.service\n" in both
    assert customize.agent_unit_override("[Unit]\nAfter=network-online.target\n[Service]\nExecStart=x\n") is None
    assert customize.agent_unit_override("[Unit]\n[Install]\nAfter=multi-user.target\n") is None
    # cloud-init images keep the package's unit (waagent, if present, does not provision there).
    root = _fake_root(tmp_path, cloud_init=True)
    customize.configure_agent(root, distros.get("debian-12-cloudinit"))
    assert not (root / "etc/systemd/system/walinuxagent.service").exists()
