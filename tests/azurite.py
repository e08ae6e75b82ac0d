"""Azurite (the Azure Storage emulator, from package.json's devDependencies) run for the tests: blob service
only, on loopback, on a port it picks, with its own data directory; stopped and removed at the end."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from imagekit.core.paths import REPO_ROOT

AZURITE = REPO_ROOT / "node_modules" / ".bin" / "azurite-blob"
# Azurite's well-known development account (published in Azurite's and Azure's documentation).
ACCOUNT = "devstoreaccount1"
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
_LISTENING = re.compile(r"successfully listens on (http://127\.0\.0\.1:(\d+))")


@dataclass
class Azurite:
    url: str  # http://127.0.0.1:PORT
    location: Path
    log: Path

    @property
    def blob_endpoint(self) -> str:
        return f"{self.url}/{ACCOUNT}"

    @property
    def connection_string(self) -> str:
        return (f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};"
                f"BlobEndpoint={self.blob_endpoint};")


@contextmanager
def running(location: Path, timeout: float = 60.0) -> Iterator[Azurite]:
    """Start Azurite's blob service; wait until it says where it listens (it picks the port: --blobPort 0)."""
    if not AZURITE.exists():
        raise RuntimeError(f"{AZURITE} is missing: run ./ik setup (it installs package.json's tools)")
    location.mkdir(parents=True, exist_ok=True)
    log = location / "azurite.out"
    with log.open("wb") as out:
        proc = subprocess.Popen([str(AZURITE), "--blobHost", "127.0.0.1", "--blobPort", "0", "--location",
                                 str(location / "data"), "--skipApiVersionCheck", "--loose"],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            m = _LISTENING.search(log.read_text(errors="replace"))
            if m:
                break
            if proc.poll() is not None:
                raise RuntimeError(f"Azurite exited with {proc.returncode}: {log.read_text(errors='replace')[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"Azurite did not start listening in {timeout:.0f} s")
            time.sleep(0.1)
        yield Azurite(url=m.group(1), location=location, log=log)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=3)  # it waits for idle keep-alive connections to close; no need to
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
