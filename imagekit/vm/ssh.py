"""SSH into a guest with paramiko: the :class:`~imagekit.vm.guest.Guest` the checks use.

The harness reaches the guest's sshd through a Unix socket that the VM's namespace child relays to
QEMU's ``hostfwd`` port (:mod:`imagekit.vm.netns`); paramiko takes that socket as ``sock``. So the
connection never touches the host's network and needs no port on the host.

Host keys are never written anywhere (no known_hosts). A :class:`HostKeyPolicy` decides:

* when the guest's agent reported its keys through the platform — cloud-init prints them between
  ``-----BEGIN SSH HOST KEY KEYS-----`` / ``FINGERPRINTS-----`` markers on the serial console, which
  :func:`host_keys_from_console` parses — the server's key must be one of them;
* otherwise the first key seen is trusted for the life of this object only (in memory), and a later
  different key is refused.

:meth:`SSHGuest.connect` retries to a deadline while sshd restarts (both agents restart it after
regenerating host keys, and slirp's forward accepts before the guest's sshd listens).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import re
import shlex
import socket
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import paramiko

from imagekit.core.errors import ImagekitError, InputError, VMError
from imagekit.vm.guest import CommandResult

log = logging.getLogger(__name__)
# paramiko logs a traceback from its transport thread for every refused attempt while sshd restarts;
# the retry loop reports what matters. (A handler here keeps them off Python's last-resort stderr.)
logging.getLogger("paramiko").addHandler(logging.NullHandler())

_RETRYABLE = (OSError, EOFError, paramiko.SSHException)
_MAX_OUTPUT = 16 * 1024 * 1024


class HostKeyMismatch(ImagekitError):
    """The guest's SSH host key is not the one the platform reported (or seen before)."""


class SSHTimeout(VMError):
    """SSH login did not succeed before the deadline."""


def fingerprint_sha256(key: paramiko.PKey) -> str:
    """``SHA256:...`` as ``ssh-keygen -l`` prints it."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


_KEYS_BLOCK = re.compile(r"-----BEGIN SSH HOST KEY KEYS-----(.*?)-----END SSH HOST KEY KEYS-----", re.S)
_FP_BLOCK = re.compile(
    r"-----BEGIN SSH HOST KEY FINGERPRINTS-----(.*?)-----END SSH HOST KEY FINGERPRINTS-----", re.S)
_KEY_LINE = re.compile(r"((?:ssh|ecdsa|sk)-[A-Za-z0-9@.-]+) ([A-Za-z0-9+/]+={0,3})")
_FP_LINE = re.compile(r"(SHA256:[A-Za-z0-9+/]{43})")


@dataclass(frozen=True)
class ReportedHostKeys:
    """Host keys the guest reported: full public keys (type, base64 blob) and SHA256 fingerprints."""

    keys: frozenset[tuple[str, str]] = frozenset()
    fingerprints: frozenset[str] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.keys or self.fingerprints)

    def matches(self, key: paramiko.PKey) -> bool:
        if (key.get_name(), key.get_base64()) in self.keys:
            return True
        return fingerprint_sha256(key) in self.fingerprints


def host_keys_from_console(text: str) -> ReportedHostKeys:
    """The host keys cloud-init printed on the serial console (the last block of each kind wins)."""
    keys: set[tuple[str, str]] = set()
    fps: set[str] = set()
    blocks = _KEYS_BLOCK.findall(text)
    if blocks:
        keys = {(m.group(1), m.group(2)) for m in _KEY_LINE.finditer(blocks[-1])}
    fblocks = _FP_BLOCK.findall(text)
    if fblocks:
        fps = {m.group(1) for m in _FP_LINE.finditer(fblocks[-1])}
    return ReportedHostKeys(frozenset(keys), frozenset(fps))


@dataclass
class HostKeyPolicy:
    """Check a server key against the reported keys, else trust on first use (in memory only).

    ``reported`` is called at each check, so keys that appear on the console later are used as soon as
    they exist."""

    reported: Callable[[], ReportedHostKeys] | None = None
    pinned: paramiko.PKey | None = field(default=None, repr=False)
    how: str = ""

    def verify(self, key: paramiko.PKey) -> None:
        fp = fingerprint_sha256(key)
        reported = self.reported() if self.reported else ReportedHostKeys()
        if reported:
            if not reported.matches(key):
                raise HostKeyMismatch(
                    f"the guest's SSH host key {key.get_name()} {fp} is not one the guest reported "
                    f"on its console ({', '.join(sorted(reported.fingerprints)) or 'keys only'})")
            if self.how != "reported":
                log.info("SSH host key %s %s matches the key the guest reported", key.get_name(), fp)
            self.how = "reported"
            self.pinned = key
            return
        if self.pinned is None:
            log.info("SSH host key %s %s trusted on first use (in memory only)", key.get_name(), fp)
            self.pinned = key
            self.how = "first use"
            return
        if (key.get_name(), key.asbytes()) != (self.pinned.get_name(), self.pinned.asbytes()):
            raise HostKeyMismatch(
                f"the guest's SSH host key changed: first {fingerprint_sha256(self.pinned)}, now {fp}")


def load_private_key(path: Path) -> paramiko.PKey:
    """Load an unencrypted OpenSSH private key (Ed25519, ECDSA or RSA), refusing one others can read."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise InputError(f"private key {path} has mode {mode:o}; allowed: 0600 or stricter")
    for cls in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
        with contextlib.suppress(paramiko.SSHException, ValueError):
            return cls.from_private_key_file(os.fspath(path))
    raise InputError(f"private key {path} is not an unencrypted Ed25519, ECDSA or RSA key")


class SSHGuest:
    """A :class:`~imagekit.vm.guest.Guest` over SSH through a Unix socket."""

    # Takes imagekit.vm.guest.batch_script batches: several commands in one session (one sudo, one round trip).
    runs_batches = True

    def __init__(
        self,
        socket_path: Path,
        username: str,
        key: paramiko.PKey,
        *,
        policy: HostKeyPolicy | None = None,
        connect_timeout: float = 15.0,
        name: str = "",
        sudo_password: str | None = None,
    ) -> None:
        self.socket_path = Path(socket_path)
        # With an OVF password, waagent's sudoers rule asks for it: sudo then reads it from the
        # channel's stdin, never from the command line (which a guest's process list would show).
        self._sudo_password = sudo_password
        self.username = username
        self.key = key
        self.policy = policy or HostKeyPolicy()
        self.connect_timeout = connect_timeout
        self.name = name or username
        self._transport: paramiko.Transport | None = None
        self.attempts = 0
        # A first connection can stall while the guest restarts sshd: give up on it early, and allow
        # more time on each later attempt in case the guest is merely slow.
        self._kex_timeout = min(6.0, connect_timeout)

    # --- connecting -----------------------------------------------------------------------------

    def _open(self) -> paramiko.Transport:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.connect_timeout)
        try:
            sock.connect(os.fspath(self.socket_path))
            transport = paramiko.Transport(sock)
        except BaseException:
            sock.close()
            raise
        phase = "key exchange"
        try:
            transport.banner_timeout = self.connect_timeout
            # start_client returns silently when its timeout passes; a stalled exchange must be a retry.
            transport.start_client(timeout=self._kex_timeout)
            if not transport.is_active() or not transport.initial_kex_done:
                raise paramiko.SSHException(f"key exchange did not finish within {self._kex_timeout:.0f} s")
            self.policy.verify(transport.get_remote_server_key())
            phase = "authentication"
            transport.auth_publickey(self.username, self.key)
            if not transport.is_authenticated():
                raise paramiko.AuthenticationException("public key not accepted")
            transport.set_keepalive(30)
            return transport
        except BaseException as exc:
            transport.close()
            if isinstance(exc, paramiko.SSHException) and not isinstance(exc, paramiko.AuthenticationException):
                raise paramiko.SSHException(f"{exc} (during {phase})") from exc
            raise

    def connect(self, timeout: float = 300.0, *, alive: Callable[[], None] | None = None) -> float:
        """Log in, retrying until ``timeout``; ``alive`` is called between attempts (it raises when the
        VM is gone, e.g. :meth:`imagekit.vm.runner.VM.check`). Returns the seconds it took."""
        start = time.monotonic()
        deadline = start + timeout
        last: BaseException | None = None
        delay = 0.5
        while True:
            if alive:
                alive()
            self.attempts += 1
            attempt_start = time.monotonic()
            try:
                self._transport = self._open()
                log.debug("SSH to %s as %s up after %d attempt(s)", self.name, self.username, self.attempts)
                return time.monotonic() - start
            except HostKeyMismatch:
                raise
            except _RETRYABLE as exc:
                last = exc
                if "key exchange did not finish" in str(exc):
                    self._kex_timeout = min(self._kex_timeout * 1.5, self.connect_timeout)
                log.debug("SSH attempt %d to %s failed after %.1f s: %s: %s", self.attempts, self.name,
                          time.monotonic() - attempt_start, type(exc).__name__, exc)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SSHTimeout(
                    f"SSH login to {self.name} as {self.username} did not succeed within {timeout:.0f} s "
                    f"({self.attempts} attempts; last error: {type(last).__name__}: {last})")
            # Back off a little: sshd restarts take seconds, and every attempt costs the guest CPU time.
            time.sleep(min(delay, remaining))
            delay = min(delay * 1.5, 3.0)

    @property
    def connected(self) -> bool:
        return self._transport is not None and self._transport.is_active()

    def _require(self) -> paramiko.Transport:
        if self._transport is None or not self._transport.is_active():
            raise VMError(f"SSH connection to {self.name} is not open")
        return self._transport

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def __enter__(self) -> SSHGuest:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # --- Guest -----------------------------------------------------------------------------------

    def run(self, command: str, *, sudo: bool = True, timeout: float = 120.0) -> CommandResult:
        """Run ``command`` through ``sh -c`` (as root when ``sudo``); a non-zero exit is a result, not
        an error. Raises :class:`VMError` only if the guest cannot be reached or the command outlives
        ``timeout``."""
        wrapped = f"sh -c {shlex.quote(command)}"
        feed_password = sudo and self.username != "root" and self._sudo_password is not None
        if sudo and self.username != "root":
            wrapped = f"sudo -S -p '' {wrapped}" if feed_password else f"sudo -n {wrapped}"
        transport = self._require()
        try:
            chan = transport.open_session(timeout=self.connect_timeout)
        except (paramiko.SSHException, OSError) as exc:
            raise VMError(f"SSH to {self.name}: cannot open a session: {exc}") from exc
        with contextlib.closing(chan):
            chan.settimeout(1.0)
            chan.exec_command(wrapped)
            if feed_password:
                assert self._sudo_password is not None
                chan.sendall(self._sudo_password.encode() + b"\n")
            chan.shutdown_write()
            out, err = bytearray(), bytearray()
            deadline = time.monotonic() + timeout
            while True:
                got = False
                while chan.recv_ready():
                    out += chan.recv(65536)
                    got = True
                while chan.recv_stderr_ready():
                    err += chan.recv_stderr(65536)
                    got = True
                if chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready():
                    break
                if time.monotonic() > deadline:
                    raise VMError(f"SSH to {self.name}: command did not finish within {timeout:.0f} s: "
                                  f"{command[:200]}")
                if not transport.is_active():
                    raise VMError(f"SSH to {self.name}: connection lost while running: {command[:200]}")
                if len(out) + len(err) > _MAX_OUTPUT:
                    raise VMError(f"SSH to {self.name}: output over {_MAX_OUTPUT} bytes: {command[:200]}")
                if not got:
                    # Block on the channel itself (up to its 1 s timeout) rather than sleeping.
                    with contextlib.suppress(TimeoutError, socket.timeout):
                        data = chan.recv(65536)
                        if data:
                            out += data
            code = chan.recv_exit_status()
        return CommandResult(command=command, returncode=code,
                             stdout=out.decode(errors="replace"), stderr=err.decode(errors="replace"))

    # --- files -----------------------------------------------------------------------------------

    def _sftp(self) -> paramiko.SFTPClient:
        client = paramiko.SFTPClient.from_transport(self._require())
        if client is None:
            raise VMError(f"SSH to {self.name}: cannot open SFTP")
        return client

    def get(self, remote: str, local: Path) -> Path:
        """Copy a file the login user can read from the guest to ``local`` (written atomically)."""
        local = Path(local)
        tmp = local.with_name(f".{local.name}.part")
        try:
            with self._sftp() as sftp:
                sftp.get(remote, os.fspath(tmp))
            os.replace(tmp, local)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise VMError(f"SSH to {self.name}: cannot fetch {remote}: {exc}") from exc
        return local

    def read_file(self, remote: str, *, sudo: bool = True) -> bytes:
        """A guest file's bytes, also ones only root can read (through sudo cat, base64-wrapped)."""
        res = self.run(f"base64 -w0 {shlex.quote(remote)}", sudo=sudo)
        if not res.ok:
            raise VMError(f"SSH to {self.name}: cannot read {remote}: {res.stderr.strip()}")
        return base64.b64decode(res.stdout)

    def put(self, local: Path, remote: str, mode: int = 0o644) -> None:
        """Copy ``local`` to ``remote`` (a path the login user can write)."""
        try:
            with self._sftp() as sftp:
                sftp.put(os.fspath(local), remote)
                sftp.chmod(remote, mode)
        except OSError as exc:
            raise VMError(f"SSH to {self.name}: cannot upload to {remote}: {exc}") from exc

    def write_file(self, remote: str, data: bytes, *, mode: int = 0o644, sudo: bool = True) -> None:
        """Write ``data`` to ``remote`` (as root when ``sudo``), atomically in the guest."""
        b64 = base64.b64encode(data).decode()
        q = shlex.quote(remote)
        tmp = shlex.quote(remote + ".ik-tmp")
        res = self.run(f"umask 077 && printf %s {shlex.quote(b64)} | base64 -d > {tmp} && "
                       f"chmod {mode:o} {tmp} && mv -f {tmp} {q}", sudo=sudo)
        if not res.ok:
            raise VMError(f"SSH to {self.name}: cannot write {remote}: {res.stderr.strip()}")


def generate_keypair(directory: Path, name: str = "id_ed25519") -> tuple[Path, str]:
    """A throwaway Ed25519 keypair: the private key (0600, OpenSSH format) in ``directory``, and the
    public key line. (paramiko cannot generate Ed25519 keys; cryptography, which it depends on, can.)"""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    private = ed25519.Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = private.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                serialization.PublicFormat.OpenSSH).decode()
    path = Path(directory) / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return path, f"{public} imagekit-throwaway"
