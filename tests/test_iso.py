"""The provisioning ISO: read back through every pycdlib namespace, blkid's view, mode and atomic writes,
and the ``invoke iso`` task run as a subprocess."""

from __future__ import annotations

import importlib
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from imagekit.config.profile import ProvisioningProfile
from imagekit.core.errors import InputError
from imagekit.core.paths import REPO_ROOT
from imagekit.core.run import run, which
from imagekit.media import iso
from imagekit.media.iso import OVF_PATHS, iso_volume_id, read_ovf_iso, write_ovf_iso
from imagekit.media.ovf import render_ovf_env

PASSWORD = "Iso-Pässw0rd<&>"
CUSTOM_DATA = "#cloud-config\n# <&> ü ✓\n".encode()


@pytest.fixture(scope="module")
def pubkey() -> str:
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode() + " t@x"


@pytest.fixture
def profile(pubkey: str) -> ProvisioningProfile:
    return ProvisioningProfile.create(
        hostname="iso-vm",
        username="azureuser",
        ssh_public_keys=[pubkey],
        password=PASSWORD,
        custom_data=CUSTOM_DATA,
        disable_password_auth=False,
    )


@pytest.fixture
def written(tmp_path: Path, profile: ProvisioningProfile) -> Path:
    return write_ovf_iso(profile, tmp_path / "ovf.iso")


@pytest.mark.parametrize("namespace", ["iso9660", "joliet", "rr", "udf"])
def test_file_reads_back_through_every_namespace(
    written: Path, profile: ProvisioningProfile, namespace: iso.Namespace
) -> None:
    assert read_ovf_iso(written, namespace) == render_ovf_env(profile).encode("utf-8")


def test_namespaces_hold_the_agreed_names(written: Path) -> None:
    import pycdlib

    p = pycdlib.PyCdlib()
    p.open(str(written))
    try:
        assert [c.file_identifier() for c in p.list_children(iso_path="/") if c.is_file()] == [b"OVF_ENV.XML;1"]
        assert [c.file_identifier() for c in p.list_children(joliet_path="/") if c.is_file()] == [
            "ovf-env.xml".encode("utf-16_be")
        ]
        assert [c.rock_ridge.name() for c in p.list_children(rr_path="/") if c.is_file()] == [b"ovf-env.xml"]
        assert [c.file_identifier() for c in p.list_children(udf_path="/") if c is not None and c.is_file()] == [
            b"ovf-env.xml"
        ]
    finally:
        p.close()


def test_volume_id_and_blkid(written: Path) -> None:
    assert iso_volume_id(written) == "rd_rdfe_stable"
    if which("blkid") is None:
        pytest.fail("blkid (util-linux) is missing; ./ik setup installs it")
    out = run([str(which("blkid")), "-p", "-o", "export", str(written)]).stdout
    fields = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert fields["TYPE"] == "udf", out
    assert fields["LABEL"] == "rd_rdfe_stable", out


def test_iso_is_0600_whatever_the_umask(tmp_path: Path, profile: ProvisioningProfile) -> None:
    old = os.umask(0)
    try:
        path = write_ovf_iso(profile, tmp_path / "ovf.iso")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_nothing_else_is_left_in_the_directory(tmp_path: Path, profile: ProvisioningProfile) -> None:
    write_ovf_iso(profile, tmp_path / "ovf.iso")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ovf.iso"]


def test_agents_parse_the_xml_read_from_the_iso(
    written: Path, waagent_lib: Path, cloudinit_lib: Path, pubkey: str
) -> None:
    text = read_ovf_iso(written, "udf").decode("utf-8")
    env = importlib.import_module("azurelinuxagent.common.protocol.ovfenv").OvfEnv(text)
    assert (env.hostname, env.username, env.user_password) == ("iso-vm", "azureuser", PASSWORD)
    assert env.ssh_pubkeys[0][2] == pubkey
    importlib.import_module("cloudinit.sources.DataSourceAzure")
    ci = importlib.import_module("cloudinit.sources.helpers.azure").OvfEnvXml.parse_text(text)
    assert (ci.hostname, ci.password, ci.custom_data) == ("iso-vm", PASSWORD, CUSTOM_DATA)


def test_failed_write_leaves_nothing_and_keeps_the_old_file(
    tmp_path: Path, profile: ProvisioningProfile, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "ovf.iso"
    target.write_bytes(b"old")

    def boom(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(InputError, match=r"^output: cannot write .*ovf\.iso: No space left on device"):
        write_ovf_iso(profile, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ovf.iso"]
    assert target.read_bytes() == b"old"


def test_interrupted_write_leaves_nothing(
    tmp_path: Path, profile: ProvisioningProfile, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupt(src: object, dst: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupt)
    with pytest.raises(KeyboardInterrupt):
        write_ovf_iso(profile, tmp_path / "ovf.iso")
    assert list(tmp_path.iterdir()) == []


def test_output_errors(tmp_path: Path, profile: ProvisioningProfile) -> None:
    with pytest.raises(InputError, match=r"^output: directory .* does not exist"):
        write_ovf_iso(profile, tmp_path / "missing" / "ovf.iso")
    with pytest.raises(InputError, match=r"^output: .* is a directory"):
        write_ovf_iso(profile, tmp_path)
    with pytest.raises(InputError, match=r"^namespace:"):
        read_ovf_iso(tmp_path / "x.iso", "hfs")  # type: ignore[arg-type]


def test_every_namespace_has_a_path() -> None:
    assert set(OVF_PATHS) == {"iso9660", "joliet", "rr", "udf"}


# --- the invoke task, as a user runs it -------------------------------------------------------------


def _invoke() -> str:
    for candidate in (REPO_ROOT / ".venv" / "bin" / "invoke", Path(sys.executable).parent / "invoke"):
        if candidate.exists():
            return str(candidate)
    found = shutil.which("invoke")
    if found is None:
        pytest.fail("invoke is not installed; run ./ik setup")
    return found


def _run_task(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_invoke(), "iso", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
        check=False,
    )


@pytest.fixture
def inputs(tmp_path: Path, pubkey: str) -> dict[str, Path]:
    (tmp_path / "key.pub").write_text(pubkey + "\n")
    (tmp_path / "password").write_text(PASSWORD + "\n")
    (tmp_path / "user-data").write_bytes(CUSTOM_DATA)
    out = tmp_path / "out"
    out.mkdir()
    return {"key": tmp_path / "key.pub", "password": tmp_path / "password", "cd": tmp_path / "user-data", "out": out}


def test_task_writes_an_iso_the_agents_read(inputs: dict[str, Path], waagent_lib: Path, pubkey: str) -> None:
    iso_path = inputs["out"] / "ovf.iso"
    proc = _run_task(
        "--hostname", "task-vm", "--username", "azureuser", "--ssh-key", str(inputs["key"]),
        "--password-file", str(inputs["password"]), "--custom-data", str(inputs["cd"]),
        "--no-disable-password-auth", "--output", str(iso_path), "--verbose",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert PASSWORD not in proc.stdout + proc.stderr
    assert stat.S_IMODE(iso_path.stat().st_mode) == 0o600
    assert sorted(p.name for p in inputs["out"].iterdir()) == ["ovf.iso"]
    env = importlib.import_module("azurelinuxagent.common.protocol.ovfenv").OvfEnv(
        read_ovf_iso(iso_path, "udf").decode("utf-8")
    )
    assert (env.hostname, env.username, env.user_password) == ("task-vm", "azureuser", PASSWORD)
    assert env.disable_ssh_password_auth is False
    assert env.ssh_pubkeys[0][2] == pubkey
    assert env.provision_guest_agent == "true"


def test_task_default_disables_password_auth(inputs: dict[str, Path], waagent_lib: Path) -> None:
    iso_path = inputs["out"] / "ovf.iso"
    proc = _run_task("--hostname", "h", "--username", "azureuser", "--ssh-key", str(inputs["key"]), "-o", str(iso_path))
    assert proc.returncode == 0, proc.stderr
    text = read_ovf_iso(iso_path, "rr").decode("utf-8")
    assert importlib.import_module("azurelinuxagent.common.protocol.ovfenv").OvfEnv(text).disable_ssh_password_auth


@pytest.mark.parametrize(
    ("password", "username", "expect"),
    [
        ("weakpassword", "azureuser", "password: the password is not complex enough"),
        ("P@ssw0rd", "azureuser", "password: the password is one of Azure's disallowed passwords"),
        (PASSWORD, "root", "username: 'root' is a name Azure reserves"),
    ],
)
def test_task_bad_input_fails_cleanly(inputs: dict[str, Path], password: str, username: str, expect: str) -> None:
    inputs["password"].write_text(password + "\n")
    iso_path = inputs["out"] / "ovf.iso"
    proc = _run_task(
        "--hostname", "h", "--username", username, "--ssh-key", str(inputs["key"]),
        "--password-file", str(inputs["password"]), "--output", str(iso_path),
    )  # fmt: skip
    assert proc.returncode != 0
    assert expect in proc.stderr, proc.stderr
    assert "allowed:" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert password not in proc.stdout + proc.stderr
    assert list(inputs["out"].iterdir()) == []


def test_task_missing_options_fail(inputs: dict[str, Path]) -> None:
    proc = _run_task("--username", "azureuser", "--ssh-key", str(inputs["key"]))
    assert proc.returncode != 0
    assert "--hostname" in proc.stderr and "--output" in proc.stderr
    assert list(inputs["out"].iterdir()) == []
