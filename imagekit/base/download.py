"""Vendor cloud images: download, verify, convert, configure the agent (filled in next)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from imagekit.distros import Distro
from imagekit.errors import InputError

if TYPE_CHECKING:
    from imagekit.base import BaseImage


def ensure_download(distro: Distro, *, cache: Path | None = None, rebuild: bool = False) -> BaseImage:
    raise InputError(f"{distro.id}: the download source is not implemented yet; bootstrap entries work")
