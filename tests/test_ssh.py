"""SSH pieces that need no VM: the console host-key parser, the host-key policy, throwaway keys, and
SSHGuest against an in-process paramiko server on a Unix socket (a stand-in for the guest's sshd)."""

from __future__ import annotations

import socket
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import paramiko
import paramiko.common
import pytest

from imagekit.core.errors import InputError, VMError
from imagekit.vm.ssh import (
    HostKeyMismatch,
    HostKeyPolicy,
    SSHGuest,
    SSHTimeout,
    fingerprint_sha256,
    generate_keypair,
    host_keys_from_console,
    load_private_key,
)


@pytest.fixture
def keypair(tmp_path: Path) -> tuple[Path, str]:
    return generate_keypair(tmp_path)


def test_generated_key_is_private_and_loadable(keypair: tuple[Path, str]) -> None:
    path, public = keypair
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = load_private_key(path)
    assert public.startswith("ssh-ed25519 " + key.get_base64())
    # ssh-keygen agrees on the fingerprint we compute.
    pub = path.with_suffix(".pub")
    pub.write_text(public + "\n")
    out = subprocess.run(["ssh-keygen", "-l", "-f", str(pub)], capture_output=True, text=True, check=True).stdout
    assert out.split()[1] == fingerprint_sha256(key)


def test_loose_private_key_is_refused(keypair: tuple[Path, str]) -> None:
    path, _ = keypair
    path.chmod(0o644)
    with pytest.raises(InputError, match="mode 644"):
        load_private_key(path)


def _console_for(key: paramiko.PKey) -> str:
    # As cloud-init's write-ssh-key-fingerprints lands on the serial console (logger -s prefixes).
    fp = fingerprint_sha256(key)
    return (
        "[  OK  ] Started cloud-final.service\n"
        "<14>Nov 22 01:02:03 cloud-init: #############################################################\n"
        "<14>Nov 22 01:02:03 cloud-init: -----BEGIN SSH HOST KEY FINGERPRINTS-----\n"
        f"<14>Nov 22 01:02:03 cloud-init: 256 {fp} root@vm1 (ED25519)\n"
        "<14>Nov 22 01:02:03 cloud-init: -----END SSH HOST KEY FINGERPRINTS-----\n"
        "-----BEGIN SSH HOST KEY KEYS-----\n"
        f"{key.get_name()} {key.get_base64()} root@vm1\n"
        "-----END SSH HOST KEY KEYS-----\n"
    )


def test_console_parser_finds_keys_and_fingerprints() -> None:
    key = paramiko.ECDSAKey.generate()
    reported = host_keys_from_console("noise\n" + _console_for(key) + "more noise\n")
    assert (key.get_name(), key.get_base64()) in reported.keys
    assert fingerprint_sha256(key) in reported.fingerprints
    assert reported.matches(key)
    assert not reported.matches(paramiko.ECDSAKey.generate())
    assert not host_keys_from_console("no keys here")


def test_policy_checks_reported_keys() -> None:
    key, other = paramiko.ECDSAKey.generate(), paramiko.ECDSAKey.generate()
    policy = HostKeyPolicy(reported=lambda: host_keys_from_console(_console_for(key)))
    policy.verify(key)
    assert policy.how == "reported"
    with pytest.raises(HostKeyMismatch, match="not one the guest reported"):
        policy.verify(other)


def test_policy_trusts_first_use_in_memory_only() -> None:
    key, other = paramiko.ECDSAKey.generate(), paramiko.ECDSAKey.generate()
    policy = HostKeyPolicy()
    policy.verify(key)
    policy.verify(key)
    assert policy.how == "first use"
    with pytest.raises(HostKeyMismatch, match="changed"):
        policy.verify(other)


# --- SSHGuest against a stand-in server ----------------------------------------------------------------


class _Server(paramiko.ServerInterface):
    def __init__(self, allowed: paramiko.PKey) -> None:
        self.allowed = allowed
        self.commands: list[str] = []
        self.stdin_lines: list[bytes] = []

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        ok = username == "azureuser" and key.asbytes() == self.allowed.asbytes()
        return paramiko.common.AUTH_SUCCESSFUL if ok else paramiko.common.AUTH_FAILED

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if kind == "session":
            return paramiko.common.OPEN_SUCCEEDED
        return paramiko.common.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        cmd = command.decode()
        self.commands.append(cmd)

        def work() -> None:
            # Stand-in for the guest: run the command locally (without the sudo the client adds);
            # `sudo -S` reads the password from the first line of stdin, as the real sudo does.
            local = cmd.removeprefix("sudo -n ")
            if local.startswith("sudo -S -p '' "):
                local = local.removeprefix("sudo -S -p '' ")
                line = b""
                while not line.endswith(b"\n"):
                    chunk = channel.recv(1)
                    if not chunk:
                        break
                    line += chunk
                self.stdin_lines.append(line)
            proc = subprocess.run(["sh", "-c", local], capture_output=True)
            channel.sendall(proc.stdout)
            channel.sendall_stderr(proc.stderr)
            channel.send_exit_status(proc.returncode)
            channel.close()

        threading.Thread(target=work, daemon=True).start()
        return True


@pytest.fixture
def server(tmp_path: Path, keypair: tuple[Path, str]) -> Iterator[tuple[Path, _Server, paramiko.PKey]]:
    host_key = paramiko.ECDSAKey.generate()
    iface = _Server(load_private_key(keypair[0]))
    path = tmp_path / "ssh.sock"
    lsock = socket.socket(socket.AF_UNIX)
    lsock.bind(str(path))
    lsock.listen()
    stop = threading.Event()
    transports: list[paramiko.Transport] = []

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = lsock.accept()
            except OSError:
                return
            t = paramiko.Transport(conn)
            t.add_server_key(host_key)
            t.start_server(server=iface)
            transports.append(t)

    threading.Thread(target=accept, daemon=True).start()
    yield path, iface, host_key
    stop.set()
    lsock.close()
    for t in transports:
        t.close()


def test_run_returns_results_and_never_raises_on_exit_codes(
        server: tuple[Path, _Server, paramiko.PKey], keypair: tuple[Path, str]) -> None:
    path, iface, host_key = server
    with SSHGuest(path, "azureuser", load_private_key(keypair[0])) as guest:
        guest.connect(timeout=30)
        res = guest.run("echo out; echo err >&2; exit 7")
        assert (res.returncode, res.stdout, res.stderr) == (7, "out\n", "err\n")
        assert not res.ok
        assert guest.run("printf '%s' \"a'b\"", sudo=False).stdout == "a'b"
        big = guest.run("head -c 300000 /dev/zero | tr '\\0' x", sudo=False)
        assert big.ok and len(big.stdout) == 300000
    assert iface.commands[0].startswith("sudo -n sh -c ")
    assert iface.commands[1].startswith("sh -c ")
    assert guest.policy.how == "first use"
    assert guest.policy.pinned is not None and guest.policy.pinned.asbytes() == host_key.asbytes()


def test_sudo_password_goes_to_stdin_never_the_command_line(
        server: tuple[Path, _Server, paramiko.PKey], keypair: tuple[Path, str]) -> None:
    # With an OVF password waagent's sudoers rule asks for it; `sudo -n` would fail every root command.
    path, iface, _ = server
    secret = "S3cret pass'word!"
    with SSHGuest(path, "azureuser", load_private_key(keypair[0]), sudo_password=secret) as guest:
        guest.connect(timeout=30)
        assert guest.run("echo root-ish").stdout == "root-ish\n"
        assert guest.run("echo plain", sudo=False).stdout == "plain\n"
    assert iface.commands[0].startswith("sudo -S -p '' sh -c ")
    assert iface.stdin_lines == [secret.encode() + b"\n"]
    assert all(secret not in c for c in iface.commands)
    assert iface.commands[1].startswith("sh -c ")


def test_wrong_key_times_out_with_attempts(server: tuple[Path, _Server, paramiko.PKey], tmp_path: Path) -> None:
    path, _, _ = server
    other, _ = generate_keypair(tmp_path, "other")
    guest = SSHGuest(path, "azureuser", load_private_key(other))
    with pytest.raises(SSHTimeout, match="did not succeed within 2 s"):
        guest.connect(timeout=2)
    assert guest.attempts >= 1


def test_host_key_mismatch_is_not_retried(server: tuple[Path, _Server, paramiko.PKey],
                                          keypair: tuple[Path, str]) -> None:
    path, _, _ = server
    liar = paramiko.ECDSAKey.generate()
    policy = HostKeyPolicy(reported=lambda: host_keys_from_console(_console_for(liar)))
    guest = SSHGuest(path, "azureuser", load_private_key(keypair[0]), policy=policy)
    with pytest.raises(HostKeyMismatch):
        guest.connect(timeout=30)
    assert guest.attempts == 1


def test_unreachable_socket_times_out(tmp_path: Path, keypair: tuple[Path, str]) -> None:
    guest = SSHGuest(tmp_path / "nothing.sock", "azureuser", load_private_key(keypair[0]))
    with pytest.raises(SSHTimeout, match="FileNotFoundError"):
        guest.connect(timeout=1)
    with pytest.raises(VMError, match="not open"):
        guest.run("true")


def test_stalled_handshake_is_retried_not_waited_out(tmp_path: Path, keypair: tuple[Path, str]) -> None:
    # A peer that accepts and never speaks, like a connection caught by an sshd restart.
    path = tmp_path / "silent.sock"
    lsock = socket.socket(socket.AF_UNIX)
    lsock.bind(str(path))
    lsock.listen(16)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(lsock.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    try:
        guest = SSHGuest(path, "azureuser", load_private_key(keypair[0]), connect_timeout=1)
        # which timer fires first (the banner read or the key exchange) depends on the machine's load;
        # either way the stalled connection must be dropped and retried, not waited out
        with pytest.raises(SSHTimeout, match=r"key exchange did not finish|protocol banner"):
            guest.connect(timeout=4)
        assert guest.attempts >= 2
    finally:
        lsock.close()
        for c in held:
            c.close()
