"""The distro table: every shipped entry loads, and each kind of broken entry gets its promised error."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

from imagekit.config import distros
from imagekit.core.errors import ConfigError, InputError
from imagekit.core.paths import DISTROS_DIR, REPO_ROOT

ENDORSED = {
    "ubuntu-20.04", "ubuntu-22.04", "ubuntu-24.04", "debian-11", "debian-12", "debian-13", "almalinux-9",
    "rocky-9", "rhel-8", "rhel-9", "oraclelinux-8", "oraclelinux-9", "sles-12", "sles-15",
    "opensuse-leap-15", "azurelinux-2", "azurelinux-3", "flatcar",
}


def test_every_shipped_entry_loads_and_covers_the_endorsed_distros() -> None:
    table = distros.load_table()
    assert set(table) >= ENDORSED
    for d in table.values():
        assert d.path.stem == d.id
        assert d.kernel_cmdline and any(a.startswith("console=ttyS0") for a in d.kernel_cmdline)
        assert d.deprovision


def test_both_agents_are_testable_here_for_debian_12_and_13() -> None:
    table = distros.load_table()
    for ver in ("12", "13"):
        wa, ci = table[f"debian-{ver}"], table[f"debian-{ver}-cloudinit"]
        assert wa.agent is distros.Agent.WAAGENT and wa.waagent_conf["Provisioning.Agent"] == "waagent"
        assert ci.agent is distros.Agent.CLOUD_INIT and ci.waagent_conf["Provisioning.Agent"] == "cloud-init"
        for d in (wa, ci):
            assert d.buildable_here()[0], d.id
            assert "eject" in d.agent_packages  # waagent crashes after reading the DVD without it


def test_debian_family_drops_rootdelay_and_dracut_families_keep_it() -> None:
    # initramfs-tools sleeps for the whole rootdelay; dracut treats it as an upper bound
    for d in distros.load_table().values():
        has = any(a.startswith("rootdelay=") for a in d.kernel_cmdline)
        if d.family in (distros.Family.DEBIAN, distros.Family.UBUNTU):
            assert not has, d.id
        else:
            assert has, d.id


def test_debian_entries_carry_the_hyperv_kvp_daemon() -> None:
    # "Prepare a Debian VHD for Azure": verify that hyperv-daemons is installed before upload.
    debian = [d for d in distros.default_table().values() if d.family is distros.Family.DEBIAN]
    assert len(debian) == 5
    assert [d.id for d in debian if "hyperv-daemons" not in d.source.packages] == []


def test_unknown_distro_lists_the_known_ones() -> None:
    with pytest.raises(InputError) as exc:
        distros.get("debian-99")
    assert "debian-99" in str(exc.value) and "debian-12-cloudinit" in str(exc.value)


def _load(tmp_path: Path, data: dict[str, Any], name: str = "debian-12") -> distros.Distro:
    path = tmp_path / f"{name}.toml"
    path.write_text(_dump(data))
    return distros.load_file(path)


def _dump(data: dict[str, Any], prefix: str = "") -> str:
    """A tiny TOML writer, enough for the distro schema (tables last)."""
    lines, tables = [], []
    for k, v in data.items():
        key = f'"{k}"' if "." in k else k
        if isinstance(v, dict):
            tables.append((f"{prefix}{key}", v))
        else:
            lines.append(f"{key} = {_val(v)}")
    out = "\n".join(lines) + "\n"
    for name, t in tables:
        out += f"\n[{name}]\n" + _dump(t, f"{name}.")
    return out


def _val(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return "[" + ", ".join(_val(x) for x in v) + "]"


@pytest.fixture
def good() -> dict[str, Any]:
    with (DISTROS_DIR / "debian-12.toml").open("rb") as f:
        return tomllib.load(f)


def test_round_trip_of_a_good_entry(tmp_path: Path, good: dict[str, Any]) -> None:
    d = _load(tmp_path, good)
    orig = distros.load_file(DISTROS_DIR / "debian-12.toml")
    assert dataclasses.replace(d, path=orig.path) == orig
    assert d.swap_enabled and d.swap_size_mib == 256 and d.resource_mount_point == "/mnt/resource"


BROKEN: list[tuple[str, Any, str]] = [
    # (dotted key, bad value or DELETE, regex the message must match)
    ("family", "gentoo", r"key 'family': bad value 'gentoo'; allowed: one of debian, ubuntu"),
    ("agent", "systemd-networkd", r"key 'agent': bad value 'systemd-networkd'; allowed: one of waagent, cloud-init"),
    ("architectures", ["sparc"], r"key 'architectures': bad value 'sparc'; allowed: each one of x86_64, aarch64"),
    ("architectures", [], r"key 'architectures': bad value \[\]; allowed: a non-empty list"),
    ("id", "debian-13", r"key 'id': bad value 'debian-13'; allowed: the file's name"),
    ("id", "Debian 12", r"key 'id': bad value 'Debian 12'; allowed: lower-case"),
    ("name", "DELETE", r"missing key 'name'"),
    ("source.kind", "torrent", r"key 'source.kind': bad value 'torrent'; allowed: one of bootstrap, download"),
    ("source.packages", ["ok", "bad name"], r"key 'source.packages': bad value 'bad name'"),
    ("source.variant", "huge", r"key 'source.variant': bad value 'huge'; allowed: minbase"),
    ("source.mirror", "x", r"unknown key 'source.mirror'"),
    ("waagent_conf.ResourceDisk.Format", "yes", r"'waagent_conf.ResourceDisk.Format': bad value 'yes'; allowed: y, n"),
    ("waagent_conf.ResourceDisk.Filesystem", "ntfs", r"Filesystem': bad value 'ntfs'; allowed: ext4, ext3, xfs"),
    ("waagent_conf.ResourceDisk.MountPoint", "mnt", r"MountPoint': bad value 'mnt'; allowed: an absolute path"),
    ("waagent_conf.ResourceDisk.SwapSizeMB", "2G", r"SwapSizeMB': bad value '2G'; allowed: a whole number"),
    ("waagent_conf.ResourceDisk.SwapSizeMB", 2048, r"SwapSizeMB': bad value 2048; allowed: a string"),
    ("waagent_conf.Provisioning.Agent", "cloud-init", r"Agent': bad value 'cloud-init' for agent 'waagent'"),
    ("ssh.client_alive_interval", 600, r"client_alive_interval': bad value 600; allowed: 30 to 235"),
    ("ssh.permit_root_login", "yes", r"permit_root_login': bad value 'yes'; allowed: no, prohibit-password"),
    ("deprovision", [], r"key 'deprovision': bad value \[\]; allowed: a non-empty list of commands"),
    ("kernel_cmdline", "console=ttyS0", r"key 'kernel_cmdline': bad value 'console=ttyS0'; allowed: a list"),
    ("disk_size_mib", 1, r"key 'disk_size_mib': bad value 1; allowed: 2048 to 1047552"),
    ("flavour", "x", r"unknown key 'flavour'"),
]


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".", 1)
    if len(parts) == 2 and parts[0] in ("source", "ssh", "waagent_conf", "cloud_init"):
        data = data.setdefault(parts[0], {})
        key = parts[1]
    else:
        key = dotted
    if value == "DELETE":
        del data[key]
    else:
        data[key] = value


@pytest.mark.parametrize(("key", "value", "message"), BROKEN, ids=[f"{k}={v!r}" for k, v, _ in BROKEN])
def test_broken_entry_names_file_key_value_and_allowed(
    tmp_path: Path, good: dict[str, Any], key: str, value: Any, message: str
) -> None:
    _set(good, key, value)
    with pytest.raises(ConfigError) as exc:
        _load(tmp_path, good)
    text = str(exc.value)
    assert str(tmp_path / "debian-12.toml") in text
    assert re.search(message, text), text


def test_bootstrap_is_refused_for_families_it_cannot_build(tmp_path: Path, good: dict[str, Any]) -> None:
    good["family"] = "rhel"
    good["kernel_cmdline"] = [*good["kernel_cmdline"], "rootdelay=300"]
    with pytest.raises(ConfigError, match=r"'source.kind': bad value 'bootstrap' for family 'rhel'"):
        _load(tmp_path, good)


def test_swap_without_format_is_refused(tmp_path: Path, good: dict[str, Any]) -> None:
    good["waagent_conf"]["ResourceDisk.Format"] = "n"
    with pytest.raises(ConfigError, match=r"EnableSwap': bad value 'y' while ResourceDisk.Format is not 'y'"):
        _load(tmp_path, good)


def test_download_source_needs_http_urls(tmp_path: Path) -> None:
    with (DISTROS_DIR / "ubuntu-24.04.toml").open("rb") as f:
        data = tomllib.load(f)
    data["source"]["url"] = "ftp://example.invalid/x.img"
    msg = r"key 'source.url': bad value 'ftp://example.invalid/x.img'; allowed: an http"
    with pytest.raises(ConfigError, match=msg):
        _load(tmp_path, data, "ubuntu-24.04")
    data["source"]["url"] = "https://example.invalid/x.img"
    data["source"]["checksum_algorithm"] = "md5"
    with pytest.raises(ConfigError, match=r"checksum_algorithm': bad value 'md5'; allowed: sha256, sha512"):
        _load(tmp_path, data, "ubuntu-24.04")


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    p = tmp_path / "x.toml"
    p.write_text("id = \n")
    with pytest.raises(ConfigError, match=r"x.toml: not valid TOML"):
        distros.load_file(p)


def test_distros_task_prints_the_table() -> None:
    out = subprocess.run(
        [str(REPO_ROOT / ".venv/bin/invoke"), "distros"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["ID", "AGENT", "SOURCE", "BUILDS"]
    rows = {ln.split()[0]: ln for ln in lines[1:]}
    assert set(rows) == set(distros.load_table())
    assert re.search(r"debian-12-cloudinit\s+cloud-init\s+bootstrap\s+yes", rows["debian-12-cloudinit"])
    assert re.search(r"ubuntu-24.04\s+cloud-init\s+download\s+no", rows["ubuntu-24.04"])


def test_distros_task_json_for_a_ci_matrix() -> None:
    def run(*args: str) -> list[dict[str, object]]:
        out = subprocess.run([str(REPO_ROOT / ".venv/bin/invoke"), "distros", "--json", *args], cwd=REPO_ROOT,
                             capture_output=True, text=True, check=True).stdout
        rows: list[dict[str, object]] = json.loads(out)
        return rows

    table = distros.load_table()
    every = run()
    assert [r["id"] for r in every] == list(table)
    ubuntu = next(r for r in every if r["id"] == "ubuntu-24.04")
    assert ubuntu == {"id": "ubuntu-24.04", "family": "ubuntu", "version": "24.04", "agent": "cloud-init",
                      "source": "download", "buildable": False, "why": table["ubuntu-24.04"].buildable_here()[1]}
    here = run("--buildable")
    assert [r["id"] for r in here] == [d.id for d in table.values() if d.buildable_here()[0]]
    assert {"debian-12", "debian-12-cloudinit", "debian-13", "debian-13-cloudinit"} <= {str(r["id"]) for r in here}
