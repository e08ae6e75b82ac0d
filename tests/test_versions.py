"""Version numbers: Azure's Major.Minor.Patch with 32-bit parts, the date+counter default scheme."""

from __future__ import annotations

import datetime as dt

import pytest

from imagekit.core.errors import InputError
from imagekit.core.versions import MAX_PART, Version, default_version, distro_major_minor


@pytest.mark.parametrize("text", ["1.0.0", "12.0.2026112201", f"{MAX_PART}.{MAX_PART}.{MAX_PART}", "0.0.0"])
def test_valid_versions_round_trip(text: str) -> None:
    assert str(Version.parse(text)) == text


@pytest.mark.parametrize(
    "text",
    ["", "1", "1.2", "1.2.3.4", "a.b.c", "1.2.-3", f"1.2.{MAX_PART + 1}", "01.2.3", "1.2.3 beta", "v1.2.3", "1..3"],
)
def test_invalid_versions_name_the_rule(text: str) -> None:
    with pytest.raises(InputError, match=r"Major\.Minor\.Patch"):
        Version.parse(text)


def test_parts_out_of_range_rejected() -> None:
    with pytest.raises(InputError, match="out of range"):
        Version(1, 2, 2**31)
    with pytest.raises(InputError, match="out of range"):
        Version(-1, 0, 0)


def test_order_is_numeric_part_by_part() -> None:
    vs = [Version.parse(t) for t in ["1.10.0", "1.9.99", "2.0.0", "1.10.1"]]
    assert [str(v) for v in sorted(vs)] == ["1.9.99", "1.10.0", "1.10.1", "2.0.0"]


def test_distro_major_minor() -> None:
    assert distro_major_minor("12") == (12, 0)
    assert distro_major_minor("24.04") == (24, 4)
    assert distro_major_minor("stable") == (0, 0)


def test_default_scheme_date_and_counter() -> None:
    day = dt.date(2026, 11, 22)
    first = default_version("12", [], day)
    assert first == Version(12, 0, 2026112200)
    second = default_version("12", [first], day)
    assert second == Version(12, 0, 2026112201)
    # versions of other days or other major.minor don't count
    other = [Version(12, 0, 2026112105), Version(13, 0, 2026112207)]
    assert default_version("12", [first, second, *other], day) == Version(12, 0, 2026112202)
    assert default_version("12", [], dt.date(2026, 11, 23)) > second  # a later day sorts higher


def test_default_scheme_fits_32_bits_far_ahead() -> None:
    v = default_version("24.04", [], dt.date(2147, 12, 31))
    assert v.patch <= MAX_PART


def test_default_scheme_runs_out_after_100_builds() -> None:
    day = dt.date(2026, 11, 22)
    taken = [Version(12, 0, 2026112200 + i) for i in range(100)]
    with pytest.raises(InputError, match="--version"):
        default_version("12", taken, day)


@pytest.mark.parametrize("text", ["1.0." + "9" * 5000, "9" * 4301 + ".0.0", "1." + "1" * 11 + ".0"])
def test_overlong_parts_are_refused_with_a_short_message(text: str) -> None:
    """Python's int() refuses over 4300 digits (ValueError, not ours); 11 digits is over 2147483647 anyway."""
    with pytest.raises(InputError, match=r"Major\.Minor\.Patch.*2147483647") as info:
        Version.parse(text)
    assert len(str(info.value)) < 400


def test_distro_major_minor_of_an_overlong_number() -> None:
    assert distro_major_minor("9" * 5000) == (MAX_PART, 0)
