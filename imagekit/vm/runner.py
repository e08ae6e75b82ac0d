"""A QEMU virtual machine as a context manager.

::

    with VM("t1", run_dir=run_dir, os_disk=overlay, iso=iso, network=GuestNetwork(...)) as vm:
        vm.wait_until(ready_event.wait, timeout=600, what="the agent's Ready report")
        ...

Entering starts QEMU inside a private network namespace (:mod:`imagekit.vm.netns`), connects QMP
(qemu.qmp) and starts watching the serial console. Leaving asks the guest to power down through QMP
(``system_powerdown``) within a deadline, then ``quit``, then kills the process group; after an error it
skips the polite step. The private directory (sockets, configuration) is removed; the run directory keeps
the console log, QEMU's stderr and the namespace child's log.

While the VM runs, :meth:`VM.check` turns a guest panic (GUEST_PANICKED on QMP, through the pvpanic
device) or an exit nobody asked for into a :class:`~imagekit.core.errors.VMError` that carries the console tail.
:meth:`VM.wait_until` waits on any blocking signal in short slices and runs that check between them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from imagekit.core.errors import VMError
from imagekit.core.log import Timings
from imagekit.core.paths import REPO_ROOT, vms_dir
from imagekit.vm import netns, qemu

log = logging.getLogger(__name__)

WIRE_PORT = 80
HOSTGA_PORT = 32526
IMDS_PORT = 80
_SUN_PATH_MAX = 107


class VMLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Prefixes every message with the VM's name."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        return f"[{self.extra['vm'] if self.extra else '?'}] {msg}", kwargs


@dataclass(frozen=True)
class GuestNetwork:
    """What the guest's network reaches: the emulator's Unix sockets behind the Azure addresses."""

    mac: str = field(default_factory=qemu.random_mac)
    hostname: str = ""
    wire_socket: Path | None = None     # 168.63.129.16:80
    hostga_socket: Path | None = None   # 168.63.129.16:32526
    imds_socket: Path | None = None     # 169.254.169.254:80
    dns_names: Mapping[str, str] | None = None
    ssh: bool = True
    ssh_port: int = 2222

    def relays(self) -> list[netns.Relay]:
        out = []
        if self.wire_socket:
            out.append(netns.Relay("127.0.0.1", WIRE_PORT, os.fspath(self.wire_socket)))
        if self.hostga_socket:
            out.append(netns.Relay("127.0.0.1", HOSTGA_PORT, os.fspath(self.hostga_socket)))
        if self.imds_socket:
            out.append(netns.Relay(qemu.IMDS_IP, IMDS_PORT, os.fspath(self.imds_socket)))
        return out


_OWNER = ".owner"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(base: Path) -> list[Path]:
    """Remove private directories whose harness died without cleaning up (SIGKILL, power loss).

    A directory is stale when the process recorded in its ``.owner`` file is gone and it does not
    belong to a VM left running on purpose (``keep``). Its VM died with the harness (parent-death
    signal), so only files remain. A kept VM's directory goes once its record says all of its processes
    have ended (:mod:`imagekit.vm.kept`). Returns what was removed."""
    removed = []
    for d in base.glob("*-*"):
        try:
            owner = int((d / _OWNER).read_text())
            config = d / "netns.json"
            if config.exists() and json.loads(config.read_text()).get("detach"):
                from imagekit.vm.kept import ended

                if ended(d):  # a kept VM that has stopped: its secrets go now
                    shutil.rmtree(d, ignore_errors=True)
                    removed.append(d)
                continue
        except (OSError, ValueError):
            continue
        if not _pid_alive(owner):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


# The guest's own boot, as the serial console shows it: each milestone is recorded (seconds after QEMU
# started) when its line first arrives, so the report's timeline shows where an image spends its boot.
BOOT_MILESTONES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("boot loader", re.compile(r"GNU GRUB|Booting `|Welcome to GRUB")),
    ("kernel started", re.compile(r"Linux version \d")),
    ("initrd started", re.compile(r"Run /init as init process|Loading, please wait")),
    ("userspace started", re.compile(r"systemd\[1\]: systemd \d|Welcome to (?!GRUB)[^\n]*!")),
    ("agent started", re.compile(r"Azure Linux Agent Version|Cloud-init v\. \S+ running 'init-local'")),
    ("login prompt", re.compile(r"(?m)^\S+ login: ")),
)
_MILESTONE_TAIL = 256  # characters of earlier output kept in view, so a line cut between two reads still matches


class MilestoneWatch:
    """Feeds on console output as it arrives; says which :data:`BOOT_MILESTONES` each chunk completed."""

    def __init__(self) -> None:
        self.pending = list(BOOT_MILESTONES)
        self._tail = ""

    def feed(self, chunk: bytes) -> list[str]:
        text = self._tail + chunk.decode(errors="replace")
        seen = [name for name, rx in self.pending if rx.search(text)]
        self.pending = [(n, rx) for n, rx in self.pending if n not in seen]
        self._tail = text[-_MILESTONE_TAIL:]
        return seen


def private_tmpdir(name: str) -> Path:
    """A fresh 0700 directory for one VM's sockets and secrets, short enough for Unix socket paths."""
    base = vms_dir()
    base.mkdir(parents=True, exist_ok=True)
    for stale in sweep_stale(base):
        log.info("removed %s, left behind by a harness that died", stale)
    path = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=base))
    if len(os.fspath(path / "qmp.sock")) > _SUN_PATH_MAX:
        os.rmdir(path)
        path = Path(tempfile.mkdtemp(prefix=f"ik-{name}-"))
    (path / _OWNER).write_text(str(os.getpid()))
    return path


class _QMP:
    """qemu.qmp's asyncio client on its own event loop thread, with a synchronous face."""

    def __init__(self, name: str, socket_path: Path, timeout: float) -> None:
        self.events: list[dict[str, Any]] = []
        self.panicked = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"qmp-{name}", daemon=True)
        self._thread.start()
        self._client: Any = None
        self._watcher: asyncio.Task[None] | None = None
        try:
            self._call(self._connect(name, socket_path), timeout)
        except BaseException:
            self.close()
            raise

    def _call(self, coro: Any, timeout: float) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _connect(self, name: str, socket_path: Path) -> None:
        from qemu.qmp import QMPClient

        self._client = QMPClient(name)
        await self._client.connect(os.fspath(socket_path))
        self._watcher = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        with contextlib.suppress(Exception):
            async for event in self._client.events:
                self.events.append(dict(event))
                if event.get("event") == "GUEST_PANICKED":
                    self.panicked.set()

    def execute(self, cmd: str, args: Mapping[str, object] | None = None, timeout: float = 10.0) -> Any:
        return self._call(self._client.execute(cmd, dict(args) if args else None), timeout)

    async def _stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(BaseException):
                await self._watcher
        if self._client is not None:
            await self._client.disconnect()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._call(self._stop(), 5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()


class VM:
    """One QEMU guest in its own network namespace, controlled through QMP."""

    def __init__(
        self,
        name: str,
        *,
        run_dir: Path,
        memory_mib: int = 1024,
        cpus: int | None = None,
        os_disk: Path | None = None,
        os_disk_format: str = "qcow2",
        iso: Path | None = None,
        resource_disk: Path | None = None,
        network: GuestNetwork | None = None,
        kernel: Path | None = None,
        kernel_append: str = "",
        accel: qemu.Accel | None = None,
        vm_uuid: uuid.UUID | None = None,
        private_dir: Path | None = None,
        keep: bool = False,
        start_timeout: float = 30.0,
        powerdown_timeout: float = 60.0,
        timings: Timings | None = None,
    ) -> None:
        self.name = name
        self.run_dir = Path(run_dir)
        self.network = network
        self.keep = keep
        self.start_timeout = start_timeout
        self.powerdown_timeout = powerdown_timeout
        self.timings = timings if timings is not None else Timings()
        self.log = VMLogger(log, {"vm": name})
        self._own_private = private_dir is None
        self._private_arg = private_dir
        self.private_dir: Path = Path()
        self.console_log = self.run_dir / "console.log"
        self.qemu_stderr = self.run_dir / "qemu.log"
        self.netns_log = self.run_dir / "netns.log"
        self._spec_args: dict[str, Any] = dict(
            name=name, memory_mib=memory_mib, os_disk=os_disk, os_disk_format=os_disk_format,
            iso=iso, resource_disk=resource_disk, kernel=kernel, kernel_append=kernel_append,
            vm_uuid=vm_uuid or uuid.uuid4(),
        )
        self._accel = accel
        self._cpus = cpus  # None: qemu.choose_cpus() when the VM starts (what the host has free then)
        self.spec: qemu.VMSpec | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._qmp: _QMP | None = None
        self._events: list[dict[str, Any]] = []
        self._started = threading.Event()
        self._exited = threading.Event()
        self._stop_watch = threading.Event()
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self.qemu_pid: int | None = None
        self.qemu_returncode: int | None = None
        self.t_launch = 0.0
        self.t_qemu = 0.0
        self.t_first_output: float | None = None
        self._output_lock = threading.Lock()
        self.detached = False

    # --- properties ------------------------------------------------------------------------------

    @property
    def vm_uuid(self) -> uuid.UUID:
        return self._spec_args["vm_uuid"]  # type: ignore[no-any-return]

    @property
    def qmp_socket(self) -> Path:
        return self.private_dir / "qmp.sock"

    @property
    def ssh_socket(self) -> Path | None:
        if self.network is None or not self.network.ssh:
            return None
        return self.private_dir / "ssh.sock"

    @property
    def child_pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    # --- lifecycle -------------------------------------------------------------------------------

    def __enter__(self) -> VM:
        try:
            self.start()
        except BaseException:
            self._teardown(graceful=False)
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            # A block that ended normally while QEMU had died must not look like success.
            try:
                self.check()
            except BaseException:
                self._teardown(graceful=False)
                raise
        if self.keep and exc_type is None:
            self.detach()
            return
        self._teardown(graceful=exc_type is None)

    def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.private_dir = self._private_arg or private_tmpdir(self.name)
        os.chmod(self.private_dir, 0o700)
        accel = self._accel or qemu.probe_accel().accel
        net = None
        if self.network is not None:
            net = qemu.NetSpec(mac=self.network.mac, ssh_port=self.network.ssh_port,
                               hostname=self.network.hostname)
        self.console_log.write_bytes(b"")
        cpus = self._cpus if self._cpus is not None else qemu.choose_cpus()
        self.spec = qemu.VMSpec(accel=accel, console_log=self.console_log, qmp_socket=self.qmp_socket,
                                net=net, cpus=cpus, **self._spec_args)
        resolv = self.private_dir / "resolv.conf"
        resolv.write_text("nameserver 127.0.0.1\n")
        config = netns.NamespaceConfig(
            qemu_argv=qemu.build_argv(self.spec),
            parent_pid=os.getpid(),
            qemu_stderr=os.fspath(self.qemu_stderr),
            relays=self.network.relays() if self.network else [],
            ssh_socket=os.fspath(self.ssh_socket) if self.ssh_socket else "",
            ssh_port=self.network.ssh_port if self.network else 0,
            dns_names=dict(self.network.dns_names) if self.network and self.network.dns_names is not None
            else None,
            resolv_conf=os.fspath(resolv),
            detach=self.keep,
        )
        config_path = self.private_dir / "netns.json"
        config_path.write_text(config.to_json())
        argv = netns.child_argv(config_path)
        self.log.info("starting QEMU (%s, %d vCPU, %d MiB) in a private network namespace",
                      accel.value, self.spec.cpus, self.spec.memory_mib)
        self.log.debug("QEMU argv: %s", config.qemu_argv)
        self.t_launch = time.monotonic()
        with open(self.netns_log, "ab") as errlog:
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errlog,
                start_new_session=True,
                # With --keep the VM outlives this process; otherwise it must die with it.
                preexec_fn=None if self.keep else netns.set_pdeathsig,
                env={**os.environ, "PYTHONPATH": os.pathsep.join(
                    p for p in (os.fspath(REPO_ROOT),
                                os.environ.get("PYTHONPATH", "")) if p)},
            )
        self._spawn(self._read_child, "child")
        if not self._started.wait(self.start_timeout) or self._exited.is_set():
            raise self._failure(f"QEMU did not start within {self.start_timeout:.0f} s")
        self.t_qemu = next(e["t"] for e in self._events if e["event"] == "started")
        self.timings.record("qemu start", self.t_qemu - self.t_launch)
        self.log.info("QEMU started (pid %s) in %.1f s", self.qemu_pid, self.t_qemu - self.t_launch)
        self._spawn(self._watch_console, "console")
        deadline = time.monotonic() + self.start_timeout
        while not self.qmp_socket.exists():
            if self._exited.wait(0.05):
                raise self._failure("QEMU exited before opening its QMP socket")
            if time.monotonic() > deadline:
                raise self._failure("QEMU did not open its QMP socket in time")
        try:
            self._qmp = _QMP(self.name, self.qmp_socket, timeout=self.start_timeout)
        except Exception as exc:
            self._exited.wait(1)
            if self._exited.is_set():
                raise self._failure("QEMU exited during start-up") from exc
            raise self._failure(f"cannot connect to QMP: {exc}") from exc
        # A panic before QMP was connected produced an event nobody heard; the run state still says so.
        with contextlib.suppress(Exception):
            if self._qmp.execute("query-status").get("status") == "guest-panicked":
                self._qmp.panicked.set()

    def _spawn(self, target: Callable[[], None], what: str) -> None:
        t = threading.Thread(target=target, name=f"{what}-{self.name}", daemon=True)
        t.start()
        self._threads.append(t)

    def _read_child(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for raw in self._proc.stdout:
            try:
                event = json.loads(raw)
            except ValueError:
                continue
            self._events.append(event)
            if event.get("event") == "started":
                self.qemu_pid = int(event["qemu_pid"])
                self._started.set()
            elif event.get("event") == "exited":
                self.qemu_returncode = int(event["returncode"])
        self._proc.wait()
        self._exited.set()
        self._started.set()

    def _note_output(self) -> None:
        """Record the first console output once (whoever sees it first: the watcher or a waiter)."""
        with self._output_lock:
            if self.t_first_output is not None:
                return
            self.t_first_output = time.monotonic()
        elapsed = self.t_first_output - self.t_qemu
        self.timings.record("first console output", elapsed)
        self.log.info("first console output %.1f s after QEMU started", elapsed)

    def _watch_console(self) -> None:
        # Polling the file's size is the cheapest honest signal for "the guest said something"; after that,
        # the new output is read as it comes and each boot milestone is recorded when its line arrives.
        watch = MilestoneWatch()
        offset = 0
        while watch.pending and not self._stop_watch.is_set() and not self._exited.is_set():
            try:
                size = self.console_log.stat().st_size
            except OSError:
                size = 0
            if size > offset:
                self._note_output()
                with contextlib.suppress(OSError), self.console_log.open("rb") as f:
                    f.seek(offset)
                    chunk = f.read(size - offset)
                    offset += len(chunk)
                    for name in watch.feed(chunk):
                        self.timings.record(name, self.since_start())
                        self.log.debug("%s %.1f s after QEMU started", name, self.since_start())
            self._stop_watch.wait(0.1 if self.t_first_output is None else 0.25)

    def since_start(self) -> float:
        """Seconds since QEMU started."""
        return time.monotonic() - self.t_qemu

    def mark(self, name: str) -> float:
        """Record ``name`` in the timings as seconds since QEMU started, and log it."""
        elapsed = self.since_start()
        self.timings.record(name, elapsed)
        self.log.info("%s %.1f s after QEMU started", name, elapsed)
        return elapsed

    # --- state -----------------------------------------------------------------------------------

    def console_text(self) -> str:
        try:
            return self.console_log.read_bytes().decode(errors="replace")
        except OSError:
            return ""

    def console_tail(self, lines: int = 40) -> str:
        return "\n".join(self.console_text().splitlines()[-lines:])

    def _child_error(self) -> str:
        for e in self._events:
            if e.get("event") == "error":
                return str(e.get("message", ""))
        return ""

    def _stderr_tail(self, path: Path, lines: int = 10) -> str:
        try:
            return "\n".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
        except OSError:
            return ""

    def _failure(self, message: str) -> VMError:
        details = []
        err = self._child_error()
        if err:
            details.append(f"namespace child: {err}")
        for what, path in (("QEMU", self.qemu_stderr), ("namespace child", self.netns_log)):
            tail = self._stderr_tail(path)
            if tail:
                details.append(f"{what} stderr ({path}):\n" + "\n".join("    " + ln for ln in tail.splitlines()))
        if details:
            message += "\n  " + "\n  ".join(details)
        return VMError(f"VM {self.name}: {message}", console_tail=self.console_tail(),
                       hint=f"full console log: {self.console_log}")

    def running(self) -> bool:
        return self._proc is not None and not self._exited.is_set() and self.qemu_returncode is None

    def check(self) -> None:
        """Raise :class:`VMError` if the guest panicked or QEMU exited without being asked to."""
        if self._qmp is not None and self._qmp.panicked.is_set():
            raise self._failure("the guest kernel panicked (GUEST_PANICKED from the pvpanic device)")
        if self._proc is not None and not self._stopping and (
                self._exited.is_set() or self.qemu_returncode is not None):
            rc = self.qemu_returncode
            how = (f"killed by signal {-rc}" if rc is not None and rc < 0
                   else f"exit code {rc}" if rc is not None else "the namespace child died")
            raise self._failure(f"QEMU exited unexpectedly ({how})")

    def status(self) -> str:
        """QEMU's run state (``running``, ``paused``, ``guest-panicked``, ...)."""
        if self._qmp is None:
            raise self._failure("QMP is not connected")
        try:
            return str(self._qmp.execute("query-status")["status"])
        except Exception as exc:
            self.check()
            raise self._failure(f"QMP query-status failed: {exc}") from exc

    def wait_until(self, cond: Callable[[float], bool], *, timeout: float, what: str,
                   slice_seconds: float = 0.5) -> float:
        """Wait until ``cond(slice)`` returns True; ``cond`` blocks up to ``slice`` seconds on a real
        signal (an Event's ``wait``, a socket). Between slices the VM is checked. Returns the seconds
        waited; raises :class:`VMError` with the console tail when ``timeout`` passes."""
        start = time.monotonic()
        deadline = start + timeout
        while True:
            self.check()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._failure(f"timed out after {timeout:.0f} s waiting for {what}")
            if cond(min(slice_seconds, remaining)):
                return time.monotonic() - start

    def wait_console(self, pattern: str | re.Pattern[str], *, timeout: float, what: str) -> re.Match[str]:
        """Wait until the serial console shows ``pattern``; returns the match (the VM is checked while
        waiting, and a timeout raises :class:`VMError` with the console tail)."""
        rx = re.compile(pattern)
        found: list[re.Match[str]] = []

        def seen(slice_seconds: float) -> bool:
            text = self.console_text()
            if text:
                self._note_output()
            m = rx.search(text)
            if m:
                found.append(m)
                return True
            # A plain file gives no cheap change notification: look again a moment later.
            self._stop_watch.wait(min(slice_seconds, 0.25))
            return False

        self.wait_until(seen, timeout=timeout, what=what)
        return found[0]

    # --- stopping --------------------------------------------------------------------------------

    def _wait_exit(self, timeout: float) -> bool:
        return self._exited.wait(timeout)

    def shutdown(self, graceful: bool = True) -> None:
        """Power the guest down (ACPI, with a deadline), then ``quit``, then kill; always ends QEMU."""
        self._stopping = True
        if self._proc is None or self._exited.is_set():
            return
        if graceful and self._qmp is not None:
            try:
                self._qmp.execute("system_powerdown")
                self.log.info("asked the guest to power down (deadline %.0f s)", self.powerdown_timeout)
                if self._wait_exit(self.powerdown_timeout):
                    self.log.info("guest powered down")
                    return
                self.log.warning("guest did not power down within %.0f s; quitting QEMU", self.powerdown_timeout)
            except Exception as exc:
                self.log.debug("system_powerdown failed: %s", exc)
        if self._qmp is not None:
            with contextlib.suppress(Exception):
                self._qmp.execute("quit", timeout=5)
            if self._wait_exit(10):
                return
        self.kill()

    def kill(self) -> None:
        """Kill the namespace child's process group (QEMU is in it) at once."""
        self._stopping = True
        if self._proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, signal.SIGKILL)
        if self.qemu_pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(self.qemu_pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(10)
        self._exited.wait(5)

    def detach(self) -> None:
        """Leave the VM running (``keep``): close QMP and stop watching; the private dir stays."""
        self.detached = True
        self._close_monitors()
        state = {
            "name": self.name, "child_pid": self.child_pid, "qemu_pid": self.qemu_pid,
            "private_dir": os.fspath(self.private_dir), "ssh_socket": os.fspath(self.ssh_socket or ""),
            "console_log": os.fspath(self.console_log),
        }
        (self.run_dir / "vm.json").write_text(json.dumps(state, indent=1) + "\n")
        self.log.info("left running: stop it with ./ik vm-stop --name %s", self.name)

    def _close_monitors(self) -> None:
        self._stop_watch.set()
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None

    def _teardown(self, graceful: bool) -> None:
        errors: list[str] = []
        try:
            self.shutdown(graceful=graceful)
        except Exception as exc:
            errors.append(f"shutdown: {exc}")
            self.kill()
        finally:
            self._close_monitors()
            if self._proc is not None and self._proc.stdout is not None:
                self._proc.stdout.close()
            for t in self._threads:
                t.join(2)
            if self._own_private and self.private_dir != Path() and self.private_dir.exists():
                shutil.rmtree(self.private_dir, ignore_errors=True)
        if errors:
            self.log.warning("cleanup problems: %s", "; ".join(errors))
