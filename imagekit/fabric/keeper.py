"""Keep a kept VM's fabric serving after the harness process exits.

A :class:`~imagekit.fabric.Fabric` serves from threads of the process that created it. A VM left
running on purpose (``provision(keep=True)``) outlives that process; on Azure its WireServer and IMDS
stay, so here :func:`hand_over` moves the fabric to a small detached process::

    keeper = hand_over(fabric, watch_pid=vm.child_pid, log_path=run_dir / "fabric-keeper.log")

It stops the in-process servers, writes a handover file (0600, in the fabric's 0700 socket directory)
and starts ``python -m imagekit.fabric.keeper HANDOVER_FILE``, which reads and deletes the file at once,
builds an equivalent Fabric and serves it on the same socket paths until the watched process (the VM's
namespace child, which exits when QEMU does) is gone, or until SIGTERM; then it removes its sockets
and exits 0. The gap without a fabric is the keeper's start-up (about a second); both agents retry.

Every document the fabric serves is a pure function of the VM's identity and provisioning profile
(incarnation 1, container id derived from the vmId), so the keeper serves the same goal state and IMDS
answers. To make a future per-instance random value fail loudly instead of silently giving the agent a
different goal state, the handover carries a digest of the served documents and the keeper refuses to
serve if its own differ.

The handover file holds the profile, secrets included (the fabric is built from the same profile as
before); it is never logged, and the keeper's log names no profile value beyond the VM's name.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from imagekit.config.profile import ProvisioningProfile
from imagekit.core.errors import ImagekitError, InputError
from imagekit.core.fsutil import write_json_atomic
from imagekit.core.paths import REPO_ROOT
from imagekit.fabric.fabric import Fabric
from imagekit.fabric.http import Limits, Request
from imagekit.fabric.identity import VMIdentity
from imagekit.fabric.state import Service

log = logging.getLogger("imagekit.fabric.keeper")

HANDOVER_NAME = ".handover.json"
FORMAT_VERSION = 1
READY_LINE = b"serving\n"
POLL_SECONDS = 1.0


class HandoverError(ImagekitError):
    """The fabric could not be handed over to a keeper process."""


# --- what identifies the watched process ------------------------------------------------------------


def process_start(pid: int) -> str | None:
    """The start time (clock ticks since boot) of a live, non-zombie ``pid``; None when it is gone.

    Pairing the pid with its start time keeps a reused pid from being mistaken for the VM."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) is in parentheses and may itself contain spaces and parentheses.
    fields = raw[raw.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return fields[19]  # field 22, starttime


# --- the handover document ---------------------------------------------------------------------------


def _probe(fabric: Fabric, service: Service, target: str, headers: dict[str, str] | None = None) -> bytes:
    parts = urllib.parse.urlsplit(target)
    req = Request(method="GET", target=target, path=urllib.parse.unquote(parts.path),
                  query=urllib.parse.parse_qs(parts.query),
                  headers={k.lower(): v for k, v in (headers or {}).items()}, body=b"")
    resp = fabric.app(service)(req)
    return f"{resp.status}\n".encode() + resp.body


def documents_digest(fabric: Fabric) -> str:
    """A digest of what the agent reads from this fabric: versions, goal state and its configs, the
    HostGAPlugin versions and IMDS (extended). Equal digests mean the agent sees no change."""
    ident, profile = fabric.identity, fabric.profile
    instance = urllib.parse.quote(ident.role_instance_id(profile.hostname))
    h = hashlib.sha256()
    probes: list[tuple[Service, str, dict[str, str] | None]] = [
        (Service.WIRE, "/?comp=versions", None),
        (Service.WIRE, "/machine/?comp=goalstate", None),
        *((Service.WIRE, f"/machine/{ident.container_id}/{instance}?comp=config&type={t}&incarnation=1", None)
          for t in ("hostingEnvironmentConfig", "sharedConfig", "extensionsConfig")),
        (Service.HOSTGA, "/versions", None),
        (Service.IMDS, "/metadata/versions", {"Metadata": "true"}),
        (Service.IMDS, f"/metadata/instance?api-version={max(fabric.imds_api_versions)}&extended=true",
         {"Metadata": "true"}),
    ]
    for service, target, headers in probes:
        body = _probe(fabric, service, target, headers)
        h.update(f"{service.value} {target} {len(body)}\n".encode())
        h.update(body)
    return h.hexdigest()


def handover_document(fabric: Fabric, *, watch_pid: int) -> dict[str, Any]:
    """What it takes to build an equivalent fabric, and which process to serve for."""
    if fabric.sockets is None:
        raise HandoverError(f"the fabric of {fabric.name} is not serving on Unix sockets: nothing to hand over")
    start = process_start(watch_pid)
    if start is None:
        raise HandoverError(f"cannot hand over the fabric of {fabric.name}: process {watch_pid} is not running")
    p = fabric.profile
    return {
        "version": FORMAT_VERSION,
        "name": fabric.name,
        "sockdir": os.fspath(fabric.sockets.wire.parent),
        "watch": {"pid": watch_pid, "start": start},
        "profile": {
            "hostname": p.hostname,
            "username": p.username,
            "ssh_public_keys": list(p.ssh_public_keys),
            "password": p.password,
            "custom_data": None if p.custom_data is None else base64.b64encode(p.custom_data).decode(),
            "disable_password_auth": p.disable_password_auth,
            "provision_guest_agent": p.provision_guest_agent,
        },
        "identity": {
            "vm_uuid": str(fabric.identity.vm_uuid),
            **{f.name: getattr(fabric.identity, f.name) for f in dataclasses.fields(VMIdentity)
               if f.init and f.name != "vm_uuid"},
        },
        "limits": dataclasses.asdict(fabric.limits),
        "imds_api_versions": list(fabric.imds_api_versions),
        "digest": documents_digest(fabric),
    }


def write_handover(path: Path, doc: dict[str, Any]) -> None:
    """Write the handover file atomically with mode 0600 (it holds the profile's secrets)."""
    write_json_atomic(path, doc, mode=0o600)


@dataclass(frozen=True)
class Handover:
    fabric: Fabric
    sockdir: Path
    watch_pid: int
    watch_start: str
    digest: str


def read_handover(path: Path) -> Handover:
    """Read the handover file, delete it whatever happens, and build the fabric it describes."""
    try:
        text = path.read_text()
    finally:
        path.unlink(missing_ok=True)
    try:
        doc = json.loads(text)
        if doc.get("version") != FORMAT_VERSION:
            raise HandoverError(f"handover file format {doc.get('version')!r} is not {FORMAT_VERSION}")
        pr = doc["profile"]
        try:
            profile = ProvisioningProfile(
                hostname=pr["hostname"], username=pr["username"], ssh_public_keys=tuple(pr["ssh_public_keys"]),
                password=pr["password"],
                custom_data=None if pr["custom_data"] is None else base64.b64decode(pr["custom_data"]),
                disable_password_auth=pr["disable_password_auth"],
                provision_guest_agent=pr["provision_guest_agent"])
        except (InputError, ValueError, TypeError):
            # The validation message may quote a field's value, and the fields include secrets.
            raise HandoverError("the provisioning profile in the handover file is not valid") from None
        fabric = Fabric(profile, VMIdentity(**doc["identity"]), limits=Limits(**doc["limits"]),
                        imds_api_versions=tuple(doc["imds_api_versions"]), name=str(doc["name"]))
        return Handover(fabric=fabric, sockdir=Path(doc["sockdir"]), watch_pid=int(doc["watch"]["pid"]),
                        watch_start=str(doc["watch"]["start"]), digest=str(doc["digest"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise HandoverError(f"malformed handover file {path}: {type(exc).__name__}") from None


# --- the parent side ---------------------------------------------------------------------------------


@dataclass
class Keeper:
    """A running keeper process (detached: it does not need this process)."""

    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the keeper and wait for it (it removes its sockets); SIGKILL after ``timeout``."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def _log_tail(path: Path, lines: int = 5) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


def hand_over(fabric: Fabric, *, watch_pid: int, log_path: Path, timeout: float = 30.0) -> Keeper:
    """Move ``fabric``'s serving to a detached keeper process that serves until ``watch_pid`` exits.

    The in-process servers stop first (the keeper binds the same paths). Returns once the keeper
    serves; raises :class:`HandoverError` (with the tail of its log) when it does not within
    ``timeout`` seconds, and then no keeper process and no handover file remain."""
    doc = handover_document(fabric, watch_pid=watch_pid)
    sockdir = Path(doc["sockdir"])
    path = sockdir / HANDOVER_NAME
    write_handover(path, doc)
    proc: subprocess.Popen[bytes] | None = None
    read_fd, write_fd = os.pipe()
    try:
        t0 = time.monotonic()  # the gap the VM sees: from stopping the in-process servers to the keeper serving
        fabric.stop()
        pkg_root = os.fspath(REPO_ROOT)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (pkg_root, os.environ.get("PYTHONPATH", "")) if p)}
        with open(log_path, "ab") as err:
            os.fchmod(err.fileno(), 0o600)
            proc = subprocess.Popen(
                [sys.executable, "-m", "imagekit.fabric.keeper", "--ready-fd", str(write_fd), os.fspath(path)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, pass_fds=(write_fd,),
                start_new_session=True, env=env, cwd="/")  # "/": a long-lived process pins no directory
        os.close(write_fd)
        write_fd = -1
        got = b""
        deadline = t0 + timeout
        while not got.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([read_fd], [], [], remaining)[0]:
                raise HandoverError(f"the fabric keeper for {fabric.name} did not start serving within "
                                    f"{timeout:g} s", hint=f"its log: {log_path}\n{_log_tail(log_path)}")
            chunk = os.read(read_fd, 64)
            if not chunk:
                rc = proc.wait(10)
                raise HandoverError(f"the fabric keeper for {fabric.name} exited (code {rc}) before serving",
                                    hint=f"its log: {log_path}\n{_log_tail(log_path)}")
            got += chunk
        if got != READY_LINE:
            raise HandoverError(f"the fabric keeper for {fabric.name} said {got!r} instead of it is serving")
        log.info("%s: fabric handed over to keeper pid %d (%.2f s without a fabric; serves until pid %d exits; "
                 "log %s)",
                 fabric.name, proc.pid, time.monotonic() - t0, watch_pid, log_path)
        return Keeper(proc, log_path)
    except BaseException:
        if proc is not None:
            Keeper(proc, log_path).stop()
        raise
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)
        path.unlink(missing_ok=True)


# --- the keeper process ------------------------------------------------------------------------------


def _serve(handover_path: Path, ready_fd: int | None, stop: threading.Event) -> int:
    try:
        ho = read_handover(handover_path)
        if documents_digest(ho.fabric) != ho.digest:
            raise HandoverError("the rebuilt fabric would serve different documents than the one handed over "
                                "(the agent would see a new goal state or identity): refusing to serve")
        if process_start(ho.watch_pid) != ho.watch_start:
            raise HandoverError(f"the VM's process {ho.watch_pid} is already gone: nothing to serve")
        ho.fabric.start(ho.sockdir)
    except ImagekitError as exc:
        log.error("%s", exc)
        return 1
    except OSError as exc:
        log.error("cannot serve the fabric: %s", exc)
        return 1
    try:
        log.info("%s: serving the fabric on %s until process %d exits", ho.fabric.name, ho.sockdir, ho.watch_pid)
        if ready_fd is not None:
            with contextlib.suppress(OSError):
                os.write(ready_fd, READY_LINE)
            os.close(ready_fd)
        while not stop.wait(POLL_SECONDS):
            if process_start(ho.watch_pid) != ho.watch_start:
                log.info("%s: process %d exited; stopping the fabric", ho.fabric.name, ho.watch_pid)
                break
        else:
            log.info("%s: asked to stop; stopping the fabric", ho.fabric.name)
    finally:
        ho.fabric.stop()
    log.info("%s: served %d request(s) while kept; exiting", ho.fabric.name, len(ho.fabric.requests()))
    return 0


def main(argv: list[str]) -> int:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s fabric-keeper[%(process)d] %(levelname).1s %(message)s")
    parser = argparse.ArgumentParser(prog="python -m imagekit.fabric.keeper")
    parser.add_argument("--ready-fd", type=int, default=None, help="write 'serving' here once serving")
    parser.add_argument("handover", type=Path, help="the handover file (read, then deleted)")
    args = parser.parse_args(argv)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    return _serve(args.handover, args.ready_fd, stop)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
