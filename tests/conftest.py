"""Shared fixtures. Tests that boot a VM or build a disk image carry the ``vm`` marker."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagekit.paths import REPO_ROOT

SHARED = REPO_ROOT.parent / "shared"
FIXTURES = SHARED / "fixtures" / "walinuxagent"


@pytest.fixture
def wa_fixtures() -> Path:
    """The WALinuxAgent test data in ../shared (skips, saying why, in a clone without it)."""
    if not FIXTURES.is_dir():
        pytest.skip(f"WALinuxAgent fixtures not found at {FIXTURES} (../shared is absent in this clone)")
    return FIXTURES
