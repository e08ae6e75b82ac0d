"""Where the toolkit keeps its files."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
TEMPLATES_DIR = REPO_ROOT / "templates"
DISTROS_DIR = REPO_ROOT / "distros"
IMAGES_DIR = REPO_ROOT / "images"


def cache_dir() -> Path:
    """The cache root: ``$IMAGEKIT_CACHE``, else ``$XDG_CACHE_HOME/imagekit``, else ``~/.cache/imagekit``."""
    env = os.environ.get("IMAGEKIT_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "imagekit"


def vms_dir() -> Path:
    """Where each VM's private directory (sockets, secrets; a kept VM's record) lives."""
    return cache_dir() / "vms"
