"""Image version numbers as Azure Compute Gallery accepts them: ``Major.Minor.Patch``.

Each part is a whole number that fits a signed 32-bit integer (0 to 2147483647), as the gallery's
image-version API requires (image-standards.md §1 D). Versions order numerically, part by part, which is
how Azure picks "latest".

The default scheme: Major.Minor from the distro's own version (``12`` → 12.0, ``24.04`` → 24.4), Patch from
the build date plus a two-digit counter — ``YYYYMMDDNN`` — so a second build on the same day gets the next
counter instead of colliding, and the number still fits 32 bits (2026112299 < 2147483647).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable
from dataclasses import dataclass

from imagekit.core.errors import InputError

MAX_PART = 2**31 - 1
MAX_BUILDS_PER_DAY = 100
# At most 10 digits a part: 2147483647 has 10, and int() of a longer run is refused by Python (and slow).
_PART = r"(0|[1-9][0-9]{0,9})"
_VERSION_RE = re.compile(rf"^{_PART}\.{_PART}\.{_PART}$")
_ALLOWED = ("Azure's image version format Major.Minor.Patch, each a whole number from 0 to 2147483647 "
            "(a signed 32-bit integer) without leading zeros (e.g. 12.0.2026112201)")
_SHOWN_MAX = 40


def _shown(text: object) -> str:
    """``text`` for an error message: quoted, and cut short (with its length) when long."""
    if isinstance(text, str) and len(text) > _SHOWN_MAX:
        return f"{text[:_SHOWN_MAX]!r}... ({len(text)} characters)"
    return repr(text)


@dataclass(frozen=True, order=True)
class Version:
    major: int
    minor: int
    patch: int

    def __post_init__(self) -> None:
        for name in ("major", "minor", "patch"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_PART:
                raise InputError(f"version {name} {value!r} is out of range; allowed: {_ALLOWED}")

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"

    @classmethod
    def parse(cls, text: str) -> Version:
        """Parse and validate a user-given version (``--version``)."""
        m = _VERSION_RE.match(text.strip()) if isinstance(text, str) else None
        if not m:
            raise InputError(f"bad image version {_shown(text)}; allowed: {_ALLOWED}")
        return cls(*(int(g) for g in m.groups()))


def distro_major_minor(distro_version: str) -> tuple[int, int]:
    """Major and minor from a distro's version string (``12`` → (12, 0), ``15.6`` → (15, 6)); a
    non-numeric version such as ``stable`` gives (0, 0)."""
    m = re.match(r"^(\d+)(?:\.(\d+))?", distro_version)
    if not m:
        return 0, 0
    # A part longer than 10 digits is over MAX_PART anyway (and int() refuses over 4300 digits).
    major, minor = (int(g) if len(g) <= 10 else MAX_PART for g in (m.group(1), m.group(2) or "0"))
    return min(major, MAX_PART), min(minor, MAX_PART)


def default_version(distro_version: str, existing: Iterable[Version], today: dt.date | None = None) -> Version:
    """The next default version for a build on ``today`` (UTC), given every version already taken."""
    day = today or dt.datetime.now(dt.UTC).date()
    major, minor = distro_major_minor(distro_version)
    base = int(day.strftime("%Y%m%d")) * MAX_BUILDS_PER_DAY
    taken = [v.patch - base for v in existing
             if (v.major, v.minor) == (major, minor) and base <= v.patch < base + MAX_BUILDS_PER_DAY]
    counter = max(taken) + 1 if taken else 0
    if counter >= MAX_BUILDS_PER_DAY:
        raise InputError(
            f"{MAX_BUILDS_PER_DAY} versions of {major}.{minor} already exist for {day.isoformat()}; "
            "give one explicitly with --version"
        )
    return Version(major, minor, base + counter)
