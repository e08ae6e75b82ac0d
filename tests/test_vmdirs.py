"""Private VM directories: fresh, private, and swept when the harness that made them died."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from imagekit.vm.runner import private_tmpdir, sweep_stale


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_private_dir_is_fresh_and_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEKIT_CACHE", str(tmp_path))
    a, b = private_tmpdir("vm1"), private_tmpdir("vm1")
    assert a != b
    for d in (a, b):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
        assert (d / ".owner").read_text() == str(os.getpid())
        assert len(os.fspath(d / "qmp.sock")) < 108


def test_sweep_removes_only_dead_owners_and_keeps_kept_vms(tmp_path: Path) -> None:
    def make(name: str, owner: int, detach: bool | None = None) -> Path:
        d = tmp_path / name
        d.mkdir()
        (d / ".owner").write_text(str(owner))
        if detach is not None:
            (d / "netns.json").write_text(json.dumps({"detach": detach}))
        return d

    dead = _dead_pid()
    stale = make("vm-stale", dead, detach=False)
    early = make("vm-early", dead)  # died before the VM started
    kept = make("vm-kept", dead, detach=True)
    live = make("vm-live", os.getpid())
    foreign = tmp_path / "vm-noowner"
    foreign.mkdir()
    removed = sweep_stale(tmp_path)
    assert sorted(removed) == sorted([stale, early])
    assert not stale.exists() and not early.exists()
    assert kept.exists() and live.exists() and foreign.exists()
