"""The namespace child's plumbing, without QEMU: a stand-in payload plays the guest side.

The child (``python -m imagekit.vm.netns``) runs whatever argv it is given as "QEMU". Here that is a small
Python program that, from inside the private namespace, uses the relays exactly as slirp would (TCP to
127.0.0.1:80/:32526 and 169.254.169.254:80, DNS to 127.0.0.1:53), checks that the host is out of reach,
and listens where QEMU's hostfwd would, so the harness can come in through the SSH Unix socket.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import socketserver
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from imagekit.fabric import dns_names
from imagekit.vm import netns

GUEST_SIDE = textwrap.dedent(r"""
    import json, os, socket, sys
    import dns.message, dns.query, dns.rcode
    out, ssh_port, host_ip, host_port = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", ssh_port)); srv.listen()
    def ask(host, port):
        try:
            s = socket.create_connection((host, port), 5)
            s.sendall(b"hello"); s.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := s.recv(100):
                data += chunk
            return data.decode()
        except OSError as e:
            return "error: " + type(e).__name__
    res = {"wire": ask("127.0.0.1", 80), "hostga": ask("127.0.0.1", 32526), "imds": ask("169.254.169.254", 80),
           "host": ask(host_ip, host_port), "internet": ask("1.1.1.1", 80)}
    own_name = sys.argv[5]
    if len(sys.argv) > 6:  # another VM's guest-side listener, at the port it uses inside its own namespace
        res["peer"] = ask("127.0.0.1", int(sys.argv[6]))
    def resolve(name):
        r = dns.query.udp(dns.message.make_query(name, "A"), "127.0.0.1", timeout=5)
        return [dns.rcode.to_text(r.rcode()), [str(rr) for rrset in r.answer for rr in rrset]]
    res["dns_own"] = resolve(own_name)
    res["dns_peer"] = resolve("vmb" if own_name == "vma" else "vma")
    res["dns_other"] = resolve("example.com")
    res["resolv_conf"] = open("/etc/resolv.conf").read()
    res["links"] = sorted(name for _, name in socket.if_nameindex())
    res["netns"] = os.readlink("/proc/self/ns/net")
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f)
    os.replace(tmp, out)
    conn, _ = srv.accept()
    conn.sendall(b"guest sshd side"); conn.close()
""")


class _Tagged(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def _serve(path: Path, tag: str) -> _Tagged:
    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            data = self.rfile.read(100)
            self.wfile.write(f"{tag} got {data.decode()}".encode())

    srv = _Tagged(str(path), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def _host_ip() -> str:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("192.0.2.1", 9))  # no packet is sent; this only picks the outgoing address
        return str(s.getsockname()[0])
    finally:
        s.close()


def _events(proc: subprocess.Popen[bytes]) -> Iterator[dict[str, object]]:
    assert proc.stdout is not None
    for line in proc.stdout:
        yield json.loads(line)


class _Namespace:
    """One namespace child with a stand-in guest, and its own tagged emulator sockets."""

    def __init__(self, d: Path, name: str, ssh_port: int, host_listener: int, peer_port: int | None = None) -> None:
        d.mkdir(parents=True, exist_ok=True)
        self.dir, self.name = d, name
        self.servers = [_serve(d / f"{n}.sock", f"{name}-{n}") for n in ("wire", "hostga", "imds")]
        self.results = d / "results.json"
        resolv = d / "resolv.conf"
        resolv.write_text("nameserver 127.0.0.1\n")
        argv = [sys.executable, "-c", GUEST_SIDE, str(self.results), str(ssh_port), _host_ip(), str(host_listener)]
        argv.append(name)
        if peer_port is not None:
            argv.append(str(peer_port))
        config = netns.NamespaceConfig(
            qemu_argv=argv,
            parent_pid=os.getpid(),
            qemu_stderr=str(d / "payload.log"),
            relays=[netns.Relay("127.0.0.1", 80, str(d / "wire.sock")),
                    netns.Relay("127.0.0.1", 32526, str(d / "hostga.sock")),
                    netns.Relay("169.254.169.254", 80, str(d / "imds.sock"))],
            ssh_socket=str(d / "ssh.sock"), ssh_port=ssh_port,
            dns_names=dns_names(name, "168.63.129.100"), resolv_conf=str(resolv),
        )
        cfg = d / "netns.json"
        cfg.write_text(config.to_json())
        with open(d / "child.log", "wb") as child_log:
            self.proc = subprocess.Popen(netns.child_argv(cfg), stdout=subprocess.PIPE, stderr=child_log,
                                         start_new_session=True, preexec_fn=netns.set_pdeathsig)
        self.events = _events(self.proc)

    def wait_results(self) -> dict[str, Any]:
        started = next(self.events)
        assert started["event"] == "started", (started, (self.dir / "child.log").read_text())
        deadline = time.monotonic() + 60
        while not self.results.exists():
            assert self.proc.poll() is None and time.monotonic() < deadline, (self.dir / "payload.log").read_text()
            time.sleep(0.1)
        res: dict[str, Any] = json.loads(self.results.read_text())
        return res

    def ssh_side(self) -> bytes:
        """The harness's way in: the Unix socket, relayed to the "hostfwd" port inside."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(self.dir / "ssh.sock"))
            return s.recv(100)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for srv in self.servers:
            srv.shutdown()
            srv.server_close()


def test_relays_dns_and_isolation(tmp_path: Path, host_listener: int) -> None:
    host_resolv = Path("/etc/resolv.conf").read_text()
    ns = _Namespace(tmp_path, "vm1", 2222, host_listener)
    try:
        res = ns.wait_results()
        assert res["wire"] == "vm1-wire got hello"
        assert res["hostga"] == "vm1-hostga got hello"
        assert res["imds"] == "vm1-imds got hello"
        assert res["host"].startswith("error"), "the host's services must be out of reach"
        assert res["internet"].startswith("error")
        assert res["dns_own"] == ["NOERROR", ["168.63.129.100"]]
        assert res["dns_other"][0] == "NXDOMAIN"
        assert res["resolv_conf"] == "nameserver 127.0.0.1\n"
        assert res["links"] == ["lo"]
        assert res["netns"] != os.readlink("/proc/self/ns/net")
        assert ns.ssh_side() == b"guest sshd side"
        exited = next(ns.events)
        assert exited == {"event": "exited", "returncode": 0}
        assert ns.proc.wait(10) == 0
        # The bind mount was private to the namespace.
        assert Path("/etc/resolv.conf").read_text() == host_resolv
    finally:
        ns.close()


def test_two_vms_at_once_each_reach_only_their_own_emulator(tmp_path: Path, host_listener: int) -> None:
    """Two namespaces side by side, as two builds in parallel: each guest side's relays end at its own
    emulator, neither can reach the other's listener, and each harness gets into its own guest only."""
    a = _Namespace(tmp_path / "a", "vma", 2222, host_listener, peer_port=2223)
    b = _Namespace(tmp_path / "b", "vmb", 2223, host_listener, peer_port=2222)
    try:
        ra, rb = a.wait_results(), b.wait_results()
        for name, res in (("vma", ra), ("vmb", rb)):
            assert res["wire"] == f"{name}-wire got hello"
            assert res["hostga"] == f"{name}-hostga got hello"
            assert res["imds"] == f"{name}-imds got hello"
            assert res["dns_own"] == ["NOERROR", ["168.63.129.100"]]
            assert res["host"].startswith("error")
            # The other guest listens at this port in its own namespace; from here there is nothing there.
            assert res["peer"].startswith("error"), res["peer"]
            assert res["dns_peer"][0] == "NXDOMAIN", "one VM's DNS must not know the other VM's name"
        assert rb["dns_other"][0] == "NXDOMAIN"
        assert ra["netns"] != rb["netns"]
        assert a.ssh_side() == b"guest sshd side" and b.ssh_side() == b"guest sshd side"
        assert a.proc.wait(10) == 0 and b.proc.wait(10) == 0
    finally:
        a.close()
        b.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purpose.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] != "Z"
    except OSError:
        return False


def test_child_and_payload_die_with_the_harness(tmp_path: Path) -> None:
    """SIGKILL the harness: the parent-death signal takes the namespace child and "QEMU" with it."""
    config = tmp_path / "netns.json"
    harness = textwrap.dedent(f"""
        import json, os, subprocess, sys, time
        from imagekit.vm import netns
        cfg = netns.NamespaceConfig(qemu_argv=["sleep", "3{os.getpid()}"], parent_pid=os.getpid(),
                                    qemu_stderr={str(tmp_path / 'q.log')!r})
        open({str(config)!r}, "w").write(cfg.to_json())
        p = subprocess.Popen(netns.child_argv({str(config)!r}), stdout=subprocess.PIPE,
                             start_new_session=True, preexec_fn=netns.set_pdeathsig)
        ev = json.loads(p.stdout.readline())
        print(json.dumps({{"child": p.pid, "qemu": ev["qemu_pid"]}}), flush=True)
        time.sleep(600)
    """)
    h = subprocess.Popen([sys.executable, "-c", harness], stdout=subprocess.PIPE)
    try:
        assert h.stdout is not None
        pids = json.loads(h.stdout.readline())
        assert _alive(pids["child"]) and _alive(pids["qemu"])
        h.kill()
        h.wait()
        deadline = time.monotonic() + 20
        while (_alive(pids["child"]) or _alive(pids["qemu"])) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(pids["child"]), "namespace child outlived the harness"
        assert not _alive(pids["qemu"]), "the VM process outlived the harness"
    finally:
        if h.poll() is None:
            h.kill()
            h.wait()


# --- the relay's limits, in process (no namespace needed: the relays listen on 127.0.0.1 here) ---


def test_a_guest_holding_connections_cannot_block_the_other_endpoints_or_the_harness_ssh(tmp_path: Path) -> None:
    import asyncio

    wire_sock, imds_sock, ssh_sock = tmp_path / "wire.sock", tmp_path / "imds.sock", tmp_path / "ssh.sock"
    servers = [_serve(wire_sock, "wire"), _serve(imds_sock, "imds")]
    sshd = socket.socket()
    sshd.bind(("127.0.0.1", 0))
    sshd.listen(8)
    ssh_port = sshd.getsockname()[1]

    def sshd_loop() -> None:
        while True:
            try:
                conn, _ = sshd.accept()
            except OSError:
                return
            conn.sendall(b"SSH-2.0-guest\r\n")
            conn.close()

    threading.Thread(target=sshd_loop, daemon=True).start()
    ports = [_free_port(), _free_port()]
    config = netns.NamespaceConfig(
        qemu_argv=[], parent_pid=os.getpid(), qemu_stderr="",
        relays=[netns.Relay("127.0.0.1", ports[0], str(wire_sock)), netns.Relay("127.0.0.1", ports[1], str(imds_sock))],
        ssh_socket=str(ssh_sock), ssh_port=ssh_port, guest_idle_timeout=1.0,
    )
    loop = asyncio.new_event_loop()
    started = loop.run_until_complete(netns.start_services(config))
    runner = threading.Thread(target=loop.run_forever, daemon=True)
    runner.start()

    def ask(port: int) -> bytes:
        with socket.create_connection(("127.0.0.1", port), 10) as s:
            s.settimeout(10)
            s.sendall(b"hello")
            s.shutdown(socket.SHUT_WR)
            return s.recv(100)

    def ssh_banner() -> bytes:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(str(ssh_sock))
            return s.recv(100)

    held: list[socket.socket] = []
    try:
        # The guest opens 64 connections to the WireServer and sends nothing (the attack).
        for _ in range(64):
            held.append(socket.create_connection(("127.0.0.1", ports[0]), 10))
        time.sleep(0.3)
        assert ssh_banner() == b"SSH-2.0-guest\r\n"  # the harness's way in is not the guest's budget
        assert ask(ports[1]) == b"imds got hello"  # nor is another endpoint's
        # One more to the full endpoint is refused at once (closed, no answer).
        with socket.create_connection(("127.0.0.1", ports[0]), 10) as extra:
            extra.settimeout(10)
            assert extra.recv(100) == b""
        # The idle deadline closes the held connections, and the endpoint serves again.
        for s in held:
            s.settimeout(30)
            assert s.recv(100) == b""
        deadline = time.monotonic() + 30
        while ask(ports[0]) != b"wire got hello":
            assert time.monotonic() < deadline, "the WireServer relay never served again"
            time.sleep(0.1)
    finally:
        for s in held:
            s.close()
        async def stop() -> None:
            for srv in started:
                srv.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        runner.join(10)
        loop.close()
        sshd.close()
        for srv in servers:
            srv.shutdown()
            srv.server_close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
