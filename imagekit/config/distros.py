"""The distro table: ``distros/*.toml`` loaded into frozen :class:`Distro` objects, validated once.

Each file describes one image configuration. Code branches on this data (family, agent, source kind),
never on distro names. A bad entry raises :class:`~imagekit.core.errors.ConfigError` naming the file, the key,
the bad value and what is allowed.
"""

from __future__ import annotations

import functools
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

from imagekit.core.errors import ConfigError, InputError
from imagekit.core.paths import DISTROS_DIR


class Family(StrEnum):
    DEBIAN = "debian"
    UBUNTU = "ubuntu"
    RHEL = "rhel"
    SUSE = "suse"
    AZURELINUX = "azurelinux"
    FLATCAR = "flatcar"


class Agent(StrEnum):
    WAAGENT = "waagent"
    CLOUD_INIT = "cloud-init"


class SourceKind(StrEnum):
    BOOTSTRAP = "bootstrap"
    DOWNLOAD = "download"


class ImageFormat(StrEnum):
    QCOW2 = "qcow2"
    RAW = "raw"
    VHD = "vhd"
    VMDK = "vmdk"


class Compression(StrEnum):
    NONE = "none"
    GZ = "gz"
    XZ = "xz"
    BZ2 = "bz2"
    ZST = "zst"


ARCHITECTURES = ("x86_64", "aarch64")
CHECKSUM_ALGORITHMS = ("sha256", "sha512")
# Families whose packages this toolkit can bootstrap with mmdebstrap.
BOOTSTRAP_FAMILIES = (Family.DEBIAN,)

# waagent.conf keys whose values the toolkit reads, with what each allows. Other keys pass through
# verbatim but must look like waagent.conf keys.
_YN = ("y", "n")
WAAGENT_KEYS: dict[str, tuple[str, ...] | str] = {
    "Provisioning.Agent": ("auto", "waagent", "cloud-init", "disabled"),
    "Provisioning.Enabled": _YN,
    "Provisioning.RegenerateSshHostKeyPair": _YN,
    "Provisioning.DeleteRootPassword": _YN,
    "Provisioning.DecodeCustomData": _YN,
    "Provisioning.ExecuteCustomData": _YN,
    "ResourceDisk.Format": _YN,
    "ResourceDisk.Filesystem": ("ext4", "ext3", "xfs"),
    "ResourceDisk.MountPoint": "an absolute path",
    "ResourceDisk.EnableSwap": _YN,
    "ResourceDisk.SwapSizeMB": "a whole number of MiB, 0 or more",
    "AutoUpdate.Enabled": _YN,
    "AutoUpdate.UpdateToLatestVersion": _YN,
    "Logs.Verbose": _YN,
}
_WAAGENT_KEY_RE = re.compile(r"^[A-Z][A-Za-z0-9]*(\.[A-Za-z0-9]+)+$")
_ID_RE = re.compile(r"^[a-z0-9][a-z0-9.-]*[a-z0-9]$")
_PKG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9+._\-]*$")
_PKG_DESC = "a list of package names (letters, digits, + . _ -)"


@dataclass(frozen=True)
class Source:
    kind: SourceKind
    # bootstrap
    suite: str = ""
    variant: str = "minbase"
    components: tuple[str, ...] = ("main",)
    packages: tuple[str, ...] = ()
    # download
    url: str = ""
    checksum_url: str = ""
    checksum_algorithm: str = "sha256"
    format: ImageFormat = ImageFormat.QCOW2
    compression: Compression = Compression.NONE
    credentials: str = ""  # what a download needs besides the URL (e.g. a subscription), or ""


@dataclass(frozen=True)
class SSHSettings:
    client_alive_interval: int = 180
    permit_root_login: str = "no"


@dataclass(frozen=True)
class Distro:
    id: str
    name: str
    family: Family
    version: str
    architectures: tuple[str, ...]
    source: Source
    agent: Agent
    agent_packages: tuple[str, ...]
    waagent_conf: Mapping[str, str]
    kernel_cmdline: tuple[str, ...]
    ssh: SSHSettings
    deprovision: tuple[tuple[str, ...], ...]
    cloud_init: Mapping[str, Any] = field(default_factory=dict)
    disk_size_mib: int = 30 * 1024
    path: Path = Path()

    @property
    def waagent_provisions(self) -> bool:
        return self.agent is Agent.WAAGENT

    @property
    def resource_disk_format(self) -> bool:
        return self.waagent_conf.get("ResourceDisk.Format", "n") == "y"

    @property
    def swap_enabled(self) -> bool:
        return self.waagent_conf.get("ResourceDisk.EnableSwap", "n") == "y"

    @property
    def swap_size_mib(self) -> int:
        return int(self.waagent_conf.get("ResourceDisk.SwapSizeMB", "0"))

    @property
    def resource_mount_point(self) -> str:
        return self.waagent_conf.get("ResourceDisk.MountPoint", "/mnt/resource")

    @property
    def resource_filesystem(self) -> str:
        return self.waagent_conf.get("ResourceDisk.Filesystem", "ext4")

    def buildable_here(self) -> tuple[bool, str]:
        """Whether this machine can produce the base image, and why not."""
        if self.source.kind is SourceKind.BOOTSTRAP:
            return True, "built from the distro's packages"
        if self.source.credentials:
            return False, f"download needs {self.source.credentials}"
        return False, f"download from {urlparse(self.source.url).hostname} (needs internet access)"

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly view, used for cache keys and manifests."""
        from dataclasses import asdict

        d = asdict(self)
        d.pop("path")
        out: dict[str, Any] = _jsonable(d)
        return out


def _jsonable(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, StrEnum):
        return str(v)
    if isinstance(v, Path):
        return str(v)
    return v


class _Entry:
    """Reads keys of one TOML table, raising errors that name file, key, value and what is allowed."""

    def __init__(self, path: Path, data: Mapping[str, Any], prefix: str = "") -> None:
        self.path = path
        self.data = data
        self.prefix = prefix
        self.used: set[str] = set()

    def _name(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def fail(self, key: str, value: Any, allowed: str) -> ConfigError:
        return ConfigError(f"{self.path}: key '{self._name(key)}': bad value {value!r}; allowed: {allowed}")

    def get(self, key: str, default: Any = ..., *, kind: type | tuple[type, ...] = str, what: str = "") -> Any:
        self.used.add(key)
        if key not in self.data:
            if default is ...:
                raise ConfigError(f"{self.path}: missing key '{self._name(key)}' ({what or kind})")
            return default
        value = self.data[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.fail(key, value, what or f"a {getattr(kind, '__name__', kind)}")
        return value

    def choice(self, key: str, enum: type[StrEnum], default: Any = ...) -> Any:
        value = self.get(key, default, what="one of " + ", ".join(e.value for e in enum))
        try:
            return enum(value)
        except ValueError:
            raise self.fail(key, value, "one of " + ", ".join(e.value for e in enum)) from None

    def str_list(self, key: str, default: Any = ..., *, pattern: re.Pattern[str] | None = None,
                 allowed: tuple[str, ...] | None = None, nonempty: bool = False, what: str = "") -> tuple[str, ...]:
        desc = what or "a list of strings"
        value = self.get(key, default, kind=list, what=desc)
        if not isinstance(value, list | tuple) or not all(isinstance(x, str) for x in value):
            raise self.fail(key, value, desc)
        if nonempty and not value:
            raise self.fail(key, value, "a non-empty list")
        for x in value:
            if allowed is not None and x not in allowed:
                raise self.fail(key, x, "each one of " + ", ".join(allowed))
            if pattern is not None and not pattern.match(x):
                raise self.fail(key, x, desc)
        return tuple(value)

    def table(self, key: str, default: Any = ...) -> _Entry:
        value = self.get(key, default, kind=dict, what="a table")
        return _Entry(self.path, value, prefix=f"{self._name(key)}.")

    def no_unknown(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise ConfigError(
                f"{self.path}: unknown key '{self._name(unknown[0])}'; allowed keys here: "
                + ", ".join(sorted(self.used))
            )


def _check_url(entry: _Entry, key: str) -> str:
    url = entry.get(key, what="an http(s) URL")
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise entry.fail(key, url, "an http:// or https:// URL")
    return str(url)


def _parse_source(entry: _Entry) -> Source:
    kind = entry.choice("kind", SourceKind)
    if kind is SourceKind.BOOTSTRAP:
        src = Source(
            kind=kind,
            suite=entry.get("suite", what="a Debian suite name such as bookworm"),
            variant=entry.get("variant", "minbase"),
            components=entry.str_list("components", ["main"], pattern=_PKG_RE, what="a list of archive components"),
            packages=entry.str_list("packages", pattern=_PKG_RE, nonempty=True, what="a non-empty " + _PKG_DESC),
        )
        if src.variant not in ("minbase", "essential", "required", "important", "standard"):
            raise entry.fail("variant", src.variant, "minbase, essential, required, important, standard")
    else:
        algorithm = entry.get("checksum_algorithm", "sha256")
        if algorithm not in CHECKSUM_ALGORITHMS:
            raise entry.fail("checksum_algorithm", algorithm, ", ".join(CHECKSUM_ALGORITHMS))
        src = Source(
            kind=kind,
            url=_check_url(entry, "url"),
            checksum_url=_check_url(entry, "checksum_url"),
            checksum_algorithm=algorithm,
            format=entry.choice("format", ImageFormat),
            compression=entry.choice("compression", Compression, "none"),
            credentials=entry.get("credentials", ""),
        )
    entry.no_unknown()
    return src


def _parse_waagent_conf(entry: _Entry) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in entry.data.items():
        entry.used.add(key)
        if not _WAAGENT_KEY_RE.match(key):
            raise entry.fail(key, key, "waagent.conf keys such as ResourceDisk.Format")
        if not isinstance(value, str):
            raise entry.fail(key, value, "a string (as written in waagent.conf)")
        allowed = WAAGENT_KEYS.get(key)
        if isinstance(allowed, tuple) and value not in allowed:
            raise entry.fail(key, value, ", ".join(allowed))
        if key == "ResourceDisk.MountPoint" and not PurePosixPath(value).is_absolute():
            raise entry.fail(key, value, "an absolute path")
        if key == "ResourceDisk.SwapSizeMB" and not value.isdigit():
            raise entry.fail(key, value, "a whole number of MiB, 0 or more")
        out[key] = value
    return out


def parse_distro(path: Path, data: Mapping[str, Any]) -> Distro:
    """Validate one parsed TOML document into a :class:`Distro`."""
    e = _Entry(path, data)
    distro_id = e.get("id", what="the distro id, e.g. ubuntu-24.04")
    if not _ID_RE.match(distro_id):
        raise e.fail("id", distro_id, "lower-case letters, digits, '.' and '-'")
    if distro_id != path.stem:
        raise e.fail("id", distro_id, f"the file's name without .toml ({path.stem!r})")
    family = e.choice("family", Family)
    archs = e.str_list("architectures", allowed=ARCHITECTURES, nonempty=True)
    source = _parse_source(e.table("source"))
    if source.kind is SourceKind.BOOTSTRAP and family not in BOOTSTRAP_FAMILIES:
        raise ConfigError(
            f"{path}: key 'source.kind': bad value 'bootstrap' for family {family.value!r}; allowed: "
            f"bootstrap only for {', '.join(f.value for f in BOOTSTRAP_FAMILIES)}, otherwise download"
        )
    agent = e.choice("agent", Agent)
    waagent_conf = _parse_waagent_conf(e.table("waagent_conf"))
    pa = waagent_conf.get("Provisioning.Agent")
    expected = "waagent" if agent is Agent.WAAGENT else "cloud-init"
    if pa is not None and pa not in (expected, "auto"):
        raise ConfigError(
            f"{path}: key 'waagent_conf.Provisioning.Agent': bad value {pa!r} for agent {agent.value!r}; "
            f"allowed: {expected!r} or 'auto'"
        )
    if agent is Agent.CLOUD_INIT and waagent_conf.get("ResourceDisk.Format") == "y":
        raise ConfigError(
            f"{path}: key 'waagent_conf.ResourceDisk.Format': bad value 'y' with agent 'cloud-init'; "
            "allowed: 'n' (cloud-init owns the resource disk, two owners would fight over it)"
        )
    if waagent_conf.get("ResourceDisk.EnableSwap") == "y" and waagent_conf.get("ResourceDisk.Format") != "y":
        raise ConfigError(
            f"{path}: key 'waagent_conf.ResourceDisk.EnableSwap': bad value 'y' while ResourceDisk.Format "
            "is not 'y'; allowed: 'n', or set ResourceDisk.Format = 'y' (waagent makes swap only on a disk "
            "it formatted)"
        )
    ssh_e = e.table("ssh", {})
    ssh = SSHSettings(
        client_alive_interval=ssh_e.get("client_alive_interval", 180, kind=int),
        permit_root_login=ssh_e.get("permit_root_login", "no"),
    )
    if not 30 <= ssh.client_alive_interval <= 235:
        raise ssh_e.fail("client_alive_interval", ssh.client_alive_interval,
                         "30 to 235 seconds (Azure certification; 180 recommended)")
    if ssh.permit_root_login not in ("no", "prohibit-password"):
        raise ssh_e.fail("permit_root_login", ssh.permit_root_login, "no, prohibit-password")
    ssh_e.no_unknown()
    deprov = e.get("deprovision", kind=list, what="a non-empty list of commands (each a list of strings)")
    if not deprov or not all(
        isinstance(c, list) and c and all(isinstance(x, str) and x for x in c) for c in deprov
    ):
        raise e.fail("deprovision", deprov, "a non-empty list of commands, each a non-empty list of strings")
    cloud_init = e.get("cloud_init", {}, kind=dict)
    if agent is Agent.CLOUD_INIT and "datasource_list" not in cloud_init:
        raise ConfigError(f"{path}: missing key 'cloud_init.datasource_list' (needed with agent 'cloud-init')")
    disk_size_mib = e.get("disk_size_mib", 30 * 1024, kind=int, what="a whole number of MiB")
    if not 2048 <= disk_size_mib <= 1023 * 1024:
        raise e.fail("disk_size_mib", disk_size_mib, "2048 to 1047552 MiB (Azure: at most 1023 GB)")
    distro = Distro(
        id=distro_id,
        name=e.get("name"),
        family=family,
        version=e.get("version"),
        architectures=archs,
        source=source,
        agent=agent,
        agent_packages=e.str_list("agent_packages", pattern=_PKG_RE, nonempty=True, what="a non-empty " + _PKG_DESC),
        waagent_conf=waagent_conf,
        kernel_cmdline=e.str_list("kernel_cmdline", nonempty=True),
        ssh=ssh,
        deprovision=tuple(tuple(c) for c in deprov),
        cloud_init=cloud_init,
        disk_size_mib=disk_size_mib,
        path=path,
    )
    e.no_unknown()
    return distro


def load_file(path: Path) -> Distro:
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return parse_distro(path, data)


def load_table(directory: Path = DISTROS_DIR) -> dict[str, Distro]:
    """Load and validate every ``*.toml`` in ``directory``; ids sorted."""
    table: dict[str, Distro] = {}
    files = sorted(directory.glob("*.toml"))
    if not files:
        raise ConfigError(f"{directory}: no distro entries (*.toml) found")
    for path in files:
        d = load_file(path)
        table[d.id] = d
    return table


def default_table() -> dict[str, Distro]:
    """The table in ``distros/``, or in the directory ``$IMAGEKIT_DISTROS`` names (a table of one's own)."""
    env = os.environ.get("IMAGEKIT_DISTROS", "").strip()
    return _table_in(Path(env).resolve() if env else DISTROS_DIR)


@functools.cache
def _table_in(directory: Path) -> dict[str, Distro]:
    if not directory.is_dir():
        raise ConfigError(f"IMAGEKIT_DISTROS={str(directory)[:200]!r} is not a directory",
                          hint="a directory of distro entries (*.toml), like distros/")
    return load_table(directory)


def get(distro_id: str, table: Mapping[str, Distro] | None = None) -> Distro:
    """Look a distro up by id; an unknown id gets an error listing the known ones."""
    t = default_table() if table is None else table
    try:
        return t[distro_id]
    except KeyError:
        raise InputError(f"unknown distro {distro_id!r}; known: {', '.join(sorted(t))}") from None
