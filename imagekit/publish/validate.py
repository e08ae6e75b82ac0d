"""Checks run before anything is sent: Azure's naming rules, the version, the end of life, and the image
itself (registered, verified, its files still matching the manifest's SHA-256)."""

from __future__ import annotations

import datetime as dt
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagekit.capture import VHD_NAME, verify_artifacts
from imagekit.core.errors import BuildError, InputError
from imagekit.core.versions import Version
from imagekit.gallery import Gallery, ImageVersion

log = logging.getLogger(__name__)

_ACCOUNT_RE = re.compile(r"^[a-z0-9]{3,24}$")
_CONTAINER_RE = re.compile(r"^[a-z0-9](?:[a-z0-9]|-(?!-)){1,61}[a-z0-9]$")
# Gallery: letters, digits, '.' and '_', at most 80, starting and ending with a letter or digit.
_GALLERY_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._]{0,78}[A-Za-z0-9])?$")
# Image definition: letters, digits, '.', '-' and '_', at most 80, starting and ending with a letter or digit.
_DEFINITION_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,78}[A-Za-z0-9])?$")
# Resource group: 1-90 of letters, digits, '_', '-', '.', '(', ')'; not ending in '.'.
_GROUP_RE = re.compile(r"^[-\w._()]{0,89}[-\w_()]$")
# Publisher, offer, SKU: letters, digits, '-', '_' and '.', at most 128 (offer 64, SKU 64).
_IDENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_REGION_RE = re.compile(r"^[a-z][a-z0-9]{1,39}$")
_SUB_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_BLOB_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,1022}\.vhd$")
MAX_REPLICAS = 100  # Azure's regionalReplicaCount upper bound per region


def _shown(text: str) -> str:
    return repr(text[:40]) + ("..." if len(text) > 40 else "")


def check_storage_account(name: str) -> str:
    if not _ACCOUNT_RE.match(name):
        raise InputError(f"--storage-account: bad storage account name {_shown(name)}",
                         hint="allowed: 3-24 characters, lower-case letters and digits only (Azure's rule)")
    return name


def check_container(name: str) -> str:
    if not _CONTAINER_RE.match(name):
        raise InputError(f"--container: bad container name {_shown(name)}",
                         hint="allowed: 3-63 characters of lower-case letters, digits and '-', starting and ending "
                              "with a letter or digit, no two '-' in a row (Azure's rule)")
    return name


def check_blob_name(name: str) -> str:
    if not _BLOB_RE.match(name) or "//" in name or "/." in name:
        raise InputError(f"--blob-name: bad blob name {_shown(name)}",
                         hint="allowed: letters, digits, '.', '_', '-' and '/', ending in '.vhd' (Azure needs it "
                              "for an OS disk), at most 1024 characters")
    return name


def check_gallery(name: str) -> str:
    if not _GALLERY_RE.match(name):
        raise InputError(f"--gallery: bad gallery name {_shown(name)}",
                         hint="allowed: 1-80 letters, digits, '.' and '_', starting and ending with a letter or digit")
    return name


def check_definition(name: str) -> str:
    if not _DEFINITION_RE.match(name):
        raise InputError(f"--image-definition: bad image definition name {_shown(name)}",
                         hint="allowed: 1-80 letters, digits, '.', '-' and '_', starting and ending with a letter or "
                              "digit")
    return name


def check_resource_group(name: str, option: str = "--resource-group") -> str:
    if not _GROUP_RE.match(name):
        raise InputError(f"{option}: bad resource group name {_shown(name)}",
                         hint="allowed: 1-90 letters, digits, '_', '-', '.', '(' and ')', not ending in '.'")
    return name


def check_identifier(what: str, value: str) -> str:
    if not _IDENT_RE.match(value):
        raise InputError(f"--{what}: bad {what} {_shown(value)}",
                         hint="allowed: 1-64 letters, digits, '.', '-' and '_', starting with a letter or digit")
    return value


def check_subscription(value: str) -> str:
    if not _SUB_RE.match(value):
        raise InputError(f"--subscription: bad subscription id {_shown(value)}",
                         hint="allowed: a GUID such as 00000000-0000-0000-0000-000000000000 (az account show "
                              "--query id)")
    return value.lower()


def check_region(value: str) -> str:
    if not _REGION_RE.match(value):
        raise InputError(f"bad region {_shown(value)}",
                         hint="allowed: an Azure region's name as az account list-locations shows it, e.g. westeurope")
    return value


def parse_target_region(text: str, default_replicas: int) -> tuple[str, int]:
    """``REGION`` or ``REGION=REPLICAS``."""
    name, sep, count = text.partition("=")
    region = check_region(name.strip().lower())
    if not sep:
        return region, default_replicas
    if not count.isdigit() or not 1 <= int(count) <= MAX_REPLICAS:
        raise InputError(f"--target-region {_shown(text)}: bad replica count",
                         hint=f"allowed: REGION or REGION=N with N from 1 to {MAX_REPLICAS}")
    return region, int(count)


def check_replicas(n: int) -> int:
    if not 1 <= n <= MAX_REPLICAS:
        raise InputError(f"--replica-count: bad replica count {n}", hint=f"allowed: 1 to {MAX_REPLICAS}")
    return n


def check_version(text: str) -> Version:
    try:
        return Version.parse(text)
    except InputError as exc:
        raise InputError(f"--version: {exc.message}", hint=exc.hint) from None


def check_end_of_life(text: str, today: dt.date | None = None) -> dt.date:
    from imagekit.gallery import parse_end_of_life

    try:
        return parse_end_of_life(text, today)
    except InputError as exc:
        raise InputError(f"--end-of-life: {exc.message}", hint=exc.hint) from None


@dataclass(frozen=True)
class Source:
    """The local version to publish: its gallery entry, the VHD and the manifest's record of it."""

    image: ImageVersion
    vhd: Path
    size: int
    sha256: str
    manifest: dict[str, Any]


def _not_verified(manifest: dict[str, Any]) -> str | None:
    """Why a registered version does not count as verified (None: it does)."""
    verify = manifest.get("checks", {}).get("verify")
    if not isinstance(verify, list) or not verify:
        return "its manifest records no verify boot (checks.verify)"
    failed = [c.get("id", "?") for c in verify if c.get("status") not in ("pass", "skip", "warn")]
    if failed:
        return f"its verify boot did not pass: {', '.join(failed)}"
    opts = manifest.get("build_options", {})
    if opts.get("skip_scan") or manifest.get("leak_scan", {}).get("skipped"):
        return "it was built with the offline leak scan skipped (a test option)"
    if opts.get("skip_deprovision") or manifest.get("deprovision", {}).get("skipped"):
        return "it was built without deprovisioning (a test option)"
    return None


def check_source(gallery: Gallery, distro: str, version: Version, *, files: bool = True) -> Source:
    """The registered, verified version whose files match its manifest; anything else is an InputError.
    ``files=False`` leaves the SHA-256 of the VHD (a pass over the whole file) to :func:`check_files`."""
    image = gallery.get(distro, version)  # raises with the registered versions for an unknown one
    if image.status().value == "end-of-life":
        raise InputError(f"{distro} {version} is past its end of life ({image.end_of_life}); it is not published")
    manifest = image.manifest()
    why = _not_verified(manifest)
    if why:
        raise InputError(f"{distro} {version} is not a verified version: {why}",
                         hint="only versions that passed the whole build (scan and verify boot) are published")
    artifacts = [a for a in manifest.get("artifacts", []) if isinstance(a, dict)]
    vhd_entry = next((a for a in artifacts if a.get("name") == VHD_NAME and a.get("format") == "vhd-fixed"), None)
    if vhd_entry is None:
        raise InputError(f"{distro} {version}: its manifest lists no fixed VHD ({VHD_NAME})")
    size = int(vhd_entry["size"])
    if size % 512 or (size - 512) % (1024 * 1024):
        raise InputError(f"{distro} {version}: {VHD_NAME} is {size} bytes; Azure needs a fixed VHD of a whole "
                         "number of MiB plus its 512-byte footer")
    source = Source(image=image, vhd=image.path / VHD_NAME, size=size, sha256=str(vhd_entry["sha256"]),
                    manifest=manifest)
    if files:
        check_files(source)
    return source


def check_files(source: Source) -> None:
    """The VHD still matches its manifest (size and SHA-256)."""
    image = source.image
    log.info("checking %s against its manifest's SHA-256 (%d bytes)", source.vhd, source.size)
    entry = {"name": VHD_NAME, "size": source.size, "sha256": source.sha256}
    try:
        verify_artifacts(image.path, [entry])
    except BuildError as exc:
        raise InputError(f"{image.distro} {image.version}: refusing to publish: {exc.message}",
                         hint="a registered version's files never change; rebuild it rather than publish these") \
            from None
