"""Each VM in its own network namespace, reaching the fabric emulator and nothing else.

The harness starts ``python -m imagekit.vm.netns CONFIG.json`` under ``unshare --net --mount`` (as root) or
``unshare --user --map-root-user --net --mount`` (rootless). Inside the fresh namespace only ``lo``
exists, so QEMU's user networking (slirp) can NAT the guest's connections to nowhere but the namespace's
own loopback:

* the guest's gateway is slirp's host address 168.63.129.16, and slirp turns connections to it (to any
  address of its virtual network, in fact) into connections to 127.0.0.1 in the namespace: the relays on
  127.0.0.1:80 (WireServer) and :32526 (HostGAPlugin) carry them to the emulator's Unix sockets;
* 169.254.169.254 lies outside the virtual network, so slirp NATs it as a remote address; added to
  ``lo``, it lands on the relay on 169.254.169.254:80 (IMDS);
* slirp forwards guest DNS to the nameserver in /etc/resolv.conf; a private bind mount points that at
  127.0.0.1, where a small server answers with :func:`imagekit.fabric.dns_answer` (the VM's own name,
  as Azure's DNS resolves VM names) and nothing else;
* the harness reaches the guest's sshd through a Unix socket in the VM's private directory, relayed
  to QEMU's ``hostfwd`` port on 127.0.0.1.

The guest is untrusted, so its connections are held to limits the harness's own are not: each guest
endpoint (WireServer, HostGAPlugin, IMDS) takes at most ``guest_max_connections`` at once (the excess is
closed at once) and a guest connection with no bytes either way for ``guest_idle_timeout`` seconds is
closed. The harness's SSH relay has its own path, with no slots shared with the guest's and no idle
deadline (an SSH session may rightly be quiet), so nothing a guest does to the fabric endpoints can
block the harness's way in.

There is no route to the internet, to the host's services or to other VMs (each VM has its own
namespace). Nothing is named: the namespace dies with its last process. This child sets
PR_SET_PDEATHSIG on itself and QEMU, so killing the harness kills both.

The child reports on stdout, one JSON object a line: ``{"event": "started", "qemu_pid": N, "t": T}``
(``T`` is ``time.monotonic()``, comparable across processes), then ``{"event": "exited",
"returncode": N}``; or ``{"event": "error", "message": ...}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

from imagekit.core.errors import HostError
from imagekit.core.run import run

log = logging.getLogger("imagekit.vm.netns")

PR_SET_PDEATHSIG = 1
LOOPBACK_ALIASES = ("169.254.169.254/32",)
GUEST_MAX_CONNECTIONS = 64  # per guest endpoint; the fabric itself takes more (Limits.max_connections)
GUEST_IDLE_TIMEOUT = 30.0  # seconds without a byte either way
_DNS_MAX = 4096


@dataclass(frozen=True)
class Relay:
    """Listen on TCP ``host:port`` inside the namespace; carry each connection to Unix socket ``target``."""

    host: str
    port: int
    target: str


@dataclass(frozen=True)
class NamespaceConfig:
    qemu_argv: list[str]
    parent_pid: int
    qemu_stderr: str
    relays: list[Relay] = field(default_factory=list)
    # A Unix socket the harness connects to, relayed to 127.0.0.1:ssh_port (QEMU's hostfwd).
    ssh_socket: str = ""
    ssh_port: int = 0
    # DNS on 127.0.0.1:53 answered from these names (None: no DNS server).
    dns_names: dict[str, str] | None = None
    resolv_conf: str = ""
    # Outlive the harness (``provision --keep``): no parent-death signal on the child itself.
    detach: bool = False
    # What each guest endpoint (each relay) allows; the SSH relay is not held to these.
    guest_max_connections: int = GUEST_MAX_CONNECTIONS
    guest_idle_timeout: float = GUEST_IDLE_TIMEOUT

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> NamespaceConfig:
        data = json.loads(text)
        data["relays"] = [Relay(**r) for r in data.get("relays", [])]
        return cls(**data)


def set_pdeathsig(sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


@functools.cache
def unshare_prefix() -> tuple[str, ...]:
    """The unshare command that gives a private network and mount namespace (root or rootless)."""
    if os.geteuid() == 0:
        return ("unshare", "--net", "--mount")
    rootless = ("unshare", "--user", "--map-root-user", "--net", "--mount")
    probe = run([*rootless, "true"], check=False)
    if probe.returncode != 0:
        raise HostError(
            "cannot create a private network namespace: not root and user namespaces are not allowed "
            f"({probe.stderr.strip() or 'unshare failed'})",
            hint="run as root, or allow unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1)",
        )
    return rootless


def child_argv(config_path: Path) -> list[str]:
    """The command that runs the namespace child for the config in ``config_path``."""
    return [*unshare_prefix(), sys.executable, "-m", "imagekit.vm.netns", os.fspath(config_path)]


# --- the child (runs inside the namespace) ----------------------------------------------------------


def _emit(event: str, **fields: Any) -> None:
    # The harness may be gone (a kept VM): a closed pipe must not take the child down.
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
        sys.stdout.flush()


class _Slots:
    """A budget of concurrent connections; ``take`` never waits (over the budget, the caller refuses)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self) -> bool:
        if self.used >= self.limit:
            return False
        self.used += 1
        return True

    def give(self) -> None:
        self.used -= 1


class _Activity:
    def __init__(self) -> None:
        self.last = asyncio.get_running_loop().time()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, activity: _Activity) -> None:
    loop = asyncio.get_running_loop()
    try:
        while data := await reader.read(65536):
            activity.last = loop.time()
            writer.write(data)
            await writer.drain()
            activity.last = loop.time()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass


async def _splice(
    client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter,
    open_target: Callable[[], Any], slots: _Slots | None, idle_timeout: float | None, what: str,
) -> None:
    """Carry one connection to its target. ``slots``/``idle_timeout`` None: not limited (the harness's SSH)."""
    if slots is not None and not slots.take():
        log.info("relay %s: more than %d guest connections, refusing one", what, slots.limit)
        client_w.close()
        return
    try:
        try:
            target_r, target_w = await asyncio.wait_for(open_target(), 10)
        except (TimeoutError, OSError) as exc:
            log.info("relay %s: target unreachable: %s", what, exc)
            client_w.close()
            return
        activity = _Activity()
        pipes = asyncio.gather(_pipe(client_r, target_w, activity), _pipe(target_r, client_w, activity))
        try:
            if idle_timeout is None:
                await pipes
            else:
                loop = asyncio.get_running_loop()
                while not pipes.done():
                    remaining = activity.last + idle_timeout - loop.time()
                    if remaining <= 0:
                        log.info("relay %s: a guest connection was idle for %g s, closing it", what, idle_timeout)
                        break
                    await asyncio.wait({pipes}, timeout=remaining)
        finally:
            pipes.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pipes
            for w in (client_w, target_w):
                w.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(w.wait_closed(), 1.0)
    finally:
        if slots is not None:
            slots.give()


class _DNSProtocol(asyncio.DatagramProtocol):
    def __init__(self, answer: Callable[[bytes], bytes | None]) -> None:
        self.answer = answer
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if len(data) > _DNS_MAX or self.transport is None:
            return
        try:
            reply = self.answer(data)
        except Exception as exc:  # a bad query must never stop the server
            log.info("dns: could not answer a query from %s: %s", addr, exc)
            return
        if reply:
            self.transport.sendto(reply, addr)


def dns_answerer(names: Mapping[str, str]) -> Callable[[bytes], bytes | None]:
    from imagekit.fabric import dns_answer

    frozen = dict(names)
    return lambda query: dns_answer(query, frozen)


async def start_services(config: NamespaceConfig) -> list[Any]:
    """Bind every relay and the DNS server; return the server objects (to close them)."""
    loop = asyncio.get_running_loop()
    servers: list[Any] = []
    for relay in config.relays:
        target = relay.target
        opener = functools.partial(asyncio.open_unix_connection, target)
        what = f"{relay.host}:{relay.port}"
        # Each guest endpoint has a budget of its own: filling one leaves the others reachable.
        slots = _Slots(config.guest_max_connections)
        servers.append(await asyncio.start_server(
            functools.partial(_splice, open_target=opener, slots=slots,
                              idle_timeout=config.guest_idle_timeout, what=what),
            relay.host, relay.port, reuse_address=True, backlog=512))
    if config.ssh_socket:
        opener = functools.partial(asyncio.open_connection, "127.0.0.1", config.ssh_port)
        servers.append(await asyncio.start_unix_server(
            functools.partial(_splice, open_target=opener, slots=None, idle_timeout=None, what="ssh"),
            config.ssh_socket))
        os.chmod(config.ssh_socket, 0o600)
    if config.dns_names is not None:
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _DNSProtocol(dns_answerer(config.dns_names or {})), local_addr=("127.0.0.1", 53))
        servers.append(transport)
    return servers


def _setup_namespace(config: NamespaceConfig) -> None:
    run(["ip", "link", "set", "lo", "up"])
    for alias in LOOPBACK_ALIASES:
        run(["ip", "addr", "add", alias, "dev", "lo"])
    if config.dns_names is not None and config.resolv_conf:
        # A private mount namespace: the bind mount is invisible outside and vanishes with it.
        run(["mount", "--bind", config.resolv_conf, "/etc/resolv.conf"])


async def _child_main(config: NamespaceConfig) -> int:
    _setup_namespace(config)
    servers = await start_services(config)
    loop = asyncio.get_running_loop()
    with open(config.qemu_stderr, "ab") as err:
        qemu = await asyncio.create_subprocess_exec(
            *config.qemu_argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
            preexec_fn=set_pdeathsig)
    _emit("started", qemu_pid=qemu.pid, t=time.monotonic())

    def stop(signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            qemu.send_signal(signal.SIGTERM)
        def force() -> None:
            if qemu.returncode is None:
                qemu.kill()

        loop.call_later(5, force)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, stop, sig)
    returncode = await qemu.wait()
    for s in servers:
        s.close()
    _emit("exited", returncode=returncode)
    return 0


def main(argv: list[str]) -> int:
    # unshare(CLONE_NEWUSER) changes credentials, which clears a parent-death signal set before exec:
    # set it again here, then make sure the parent did not die in between.
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s netns[%(process)d] %(levelname).1s %(message)s")
    if len(argv) != 1:
        _emit("error", message="usage: python -m imagekit.vm.netns CONFIG.json")
        return 2
    try:
        config = NamespaceConfig.from_json(Path(argv[0]).read_text())
        if not config.detach:
            set_pdeathsig(signal.SIGKILL)
            if os.getppid() != config.parent_pid:
                return 1
        return asyncio.run(_child_main(config))
    except Exception as exc:
        _emit("error", message=f"{type(exc).__name__}: {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
