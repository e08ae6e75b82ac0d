"""Where Debian packages come from, and a fingerprint of what the archive serves right now.

The mirror is never written in code: it is read from the host's apt sources (one-line ``*.list`` and
deb822 ``*.sources`` files), or from ``$IMAGEKIT_DEBIAN_MIRROR`` (and ``$IMAGEKIT_DEBIAN_SECURITY_MIRROR``,
empty to leave security updates out). The archive fingerprint is the SHA-256 of each suite's
``InRelease`` file: it changes exactly when the package set the suite serves changes, so it stands in
for "the package set with versions" in the base-image cache key without resolving dependencies.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from imagekit.core.errors import HostError

log = logging.getLogger(__name__)

APT_DIR = Path("/etc/apt")
_TIMEOUT = 20.0


@dataclass(frozen=True)
class SourceEntry:
    uri: str
    suites: tuple[str, ...]
    components: tuple[str, ...]


@dataclass(frozen=True)
class Mirrors:
    """The archive URI and the security archive URI ("" when there is none)."""

    archive: str
    security: str = ""


@dataclass(frozen=True)
class AptSource:
    """One ``deb URI SUITE COMPONENTS`` line of the image."""

    uri: str
    suite: str
    components: tuple[str, ...]
    required: bool  # the main suite must exist; -updates and -security may be absent (old or new suites)

    def line(self) -> str:
        return f"deb {self.uri} {self.suite} {' '.join(self.components)}"

    def release_url(self) -> str:
        return f"{self.uri.rstrip('/')}/dists/{self.suite}/InRelease"


def parse_one_line(text: str) -> list[SourceEntry]:
    out: list[SourceEntry] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line.startswith("deb "):
            continue
        # drop "[ option=value ... ]"
        line = re.sub(r"\[[^\]]*\]", " ", line)
        parts = line.split()
        if len(parts) >= 3:
            out.append(SourceEntry(parts[1], (parts[2],), tuple(parts[3:])))
    return out


def parse_deb822(text: str) -> list[SourceEntry]:
    out: list[SourceEntry] = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = ""
        for raw in stanza.splitlines():
            if raw.startswith("#"):
                continue
            if raw[:1].isspace() and key:
                fields[key] += " " + raw.strip()
                continue
            if ":" in raw:
                key, _, value = raw.partition(":")
                key = key.strip().lower()
                fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() == "no":
            continue
        for uri in fields.get("uris", "").split():
            out.append(SourceEntry(uri, tuple(fields.get("suites", "").split()),
                                   tuple(fields.get("components", "").split())))
    return out


def host_sources(apt_dir: Path = APT_DIR) -> list[SourceEntry]:
    entries: list[SourceEntry] = []
    main = apt_dir / "sources.list"
    if main.is_file():
        entries += parse_one_line(main.read_text(errors="replace"))
    d = apt_dir / "sources.list.d"
    if d.is_dir():
        for f in sorted(d.iterdir()):
            if f.suffix == ".list":
                entries += parse_one_line(f.read_text(errors="replace"))
            elif f.suffix == ".sources":
                entries += parse_deb822(f.read_text(errors="replace"))
    return entries


def _debian_like(entry: SourceEntry) -> bool:
    # A Debian archive serves suites named after Debian codenames (optionally -updates/-security/...)
    # and the "main" component; third-party repositories use other suite names.
    return "main" in entry.components and any(
        re.match(r"^(buster|bullseye|bookworm|trixie|forky|duke|sid|stable|oldstable|testing|unstable)"
                 r"(-[a-z-]+)?$", s) for s in entry.suites
    )


def choose_mirrors(entries: Iterable[SourceEntry]) -> Mirrors:
    archive = security = ""
    for e in entries:
        if not _debian_like(e):
            continue
        if any(s.endswith("-security") for s in e.suites) or "/updates" in " ".join(e.suites):
            security = security or e.uri
        elif not archive:
            archive = e.uri
    return Mirrors(archive, security)


def mirrors(apt_dir: Path = APT_DIR) -> Mirrors:
    """The Debian mirrors to bootstrap from: the environment overrides the host's apt sources."""
    env_archive = os.environ.get("IMAGEKIT_DEBIAN_MIRROR", "").strip()
    env_security = os.environ.get("IMAGEKIT_DEBIAN_SECURITY_MIRROR")
    host = choose_mirrors(host_sources(apt_dir))
    archive = env_archive or host.archive
    if not archive:
        raise HostError(
            "no Debian mirror found: the host's apt sources (/etc/apt/sources.list, sources.list.d/) list "
            "no Debian archive with a 'main' component",
            hint="set IMAGEKIT_DEBIAN_MIRROR to a Debian mirror URI",
        )
    security = env_security.strip() if env_security is not None else host.security
    return Mirrors(archive, security)


def sources_for(suite: str, components: tuple[str, ...], m: Mirrors) -> list[AptSource]:
    """The apt sources of an image of ``suite``: the suite, its -updates and (if known) -security."""
    out = [AptSource(m.archive, suite, components, True), AptSource(m.archive, f"{suite}-updates", components, False)]
    if m.security:
        out.append(AptSource(m.security, f"{suite}-security", components, False))
    return out


def fetch_release(src: AptSource) -> bytes | None:
    """The suite's InRelease file, or None when the suite does not exist (404) and is optional."""
    url = src.release_url()
    try:
        with urllib.request.urlopen(url, timeout=_TIMEOUT) as resp:
            data: bytes = resp.read()
            return data
    except urllib.error.HTTPError as exc:
        if exc.code == 404 and not src.required:
            return None
        raise HostError(f"cannot read the Release file of suite {src.suite!r}: HTTP {exc.code} from {url}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise HostError(f"cannot reach the Debian mirror for suite {src.suite!r} ({url}): {exc}") from exc


def archive_fingerprint(sources: list[AptSource]) -> tuple[dict[str, str], list[AptSource]]:
    """SHA-256 of each suite's InRelease, and the sources that exist (absent optional suites dropped)."""
    fp: dict[str, str] = {}
    present: list[AptSource] = []
    for src in sources:
        data = fetch_release(src)
        if data is None:
            log.info("suite %s not served by the mirror; left out", src.suite)
            continue
        fp[src.suite] = hashlib.sha256(data).hexdigest()
        present.append(src)
    return fp, present
