"""A seeded fuzz campaign against two real fabrics on their Unix sockets, as a hostile guest would send.

Every request is generated from a seed (``IMAGEKIT_FUZZ_SEED``, default 9): random bytes, truncated and
bit-flipped agent requests, huge and repeated headers, Content-Length and chunked abuse, hostile XML
(DTDs in any encoding, entities, unknown encodings, deep nesting, huge descriptions), wrong methods, path
traversal and odd escapes, IMDS header games (X-Forwarded-For, Metadata variants), deeply nested JSON,
and bursts of 200 concurrent clients. ``IMAGEKIT_FUZZ_REQUESTS`` sets how many (default 20,000; the
campaign reported in the README ran 100,000+).

What must hold, whatever was sent: each request gets a 2xx/4xx answer (or 505 for an HTTP version that
is not served) or a clean close — never a 500, a traceback, a thread or task exception; what the fabric
keeps stays within a budget and memory does not grow from one phase to the next; and after every
phase a well-formed goal state and IMDS request still get the right answer, each fabric its own.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import socket
import threading
import tracemalloc
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from imagekit.config.profile import ProvisioningProfile
from imagekit.fabric import Fabric, Limits, SocketPaths, VMIdentity

REQUESTS = int(os.environ.get("IMAGEKIT_FUZZ_REQUESTS", "20000"))
SEED = int(os.environ.get("IMAGEKIT_FUZZ_SEED", "9"))
PHASES = 4
BURST = 200
# Independent of the product's own numbers: what one VM may make the harness keep, and how much the
# process may grow between the end of the first phase and the end of the last (resident memory, or traced
# allocations with IMAGEKIT_FUZZ_TRACEMALLOC=1). Unbounded keeping grows it by the sum of what is sent.
KEPT_BUDGET = 16 * 1024 * 1024
GROWTH_BUDGET = 48 * 1024 * 1024
LIMITS = Limits(max_body=256 * 1024, read_timeout=2.0, header_timeout=2.0, connection_deadline=5.0)

AGENT_REQUESTS = [
    b"GET /?comp=versions HTTP/1.1\r\nHost: 168.63.129.16\r\nx-ms-version: 2012-11-30\r\n\r\n",
    b"GET /machine/?comp=goalstate HTTP/1.1\r\nHost: 168.63.129.16\r\nx-ms-version: 2012-11-30\r\n"
    b"x-ms-agent-name: WALinuxAgent\r\n\r\n",
    b"GET /metadata/instance?api-version=2021-08-01&extended=true HTTP/1.1\r\nHost: 169.254.169.254\r\n"
    b"Metadata: true\r\n\r\n",
    b"GET /vmSettings HTTP/1.1\r\nHost: 168.63.129.16:32526\r\n\r\n",
    b"PUT /status HTTP/1.1\r\nHost: 168.63.129.16:32526\r\nContent-Length: 15\r\n\r\n{\"content\": 1}",
]
METHODS = [b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"TRACE", b"CONNECT", b"PATCH", b"G\x00T",
           b"get", b"X" * 300, b""]
PATHS = [b"/", b"/machine", b"/machine/", b"/../../etc/passwd", b"/%2e%2e/%2e%2e/", b"//machine//", b"/machine/%00",
         b"/metadata/instance/network/interface/%C2%B2", b"/metadata/instance/network/interface/" + b"9" * 5000,
         b"/metadata/instance/compute/../../", b"/metadata/../metadata/instance", b"/metadata/instance/%ZZ",
         b"/metadata/instance/compute/publicKeys/0/keyData", b"/HealthService", b"/vmAgentLog", b"/\xff\xfe",
         b"*", b"http://168.63.129.16/machine?comp=goalstate", b"/a?" + b"&".join(b"k%d=v" % i for i in range(80))]
QUERIES = [b"", b"?comp=goalstate", b"?comp=health", b"?comp=versions", b"?comp=telemetrydata",
           b"?api-version=2021-02-01", b"?api-version=2021-02-01&format=text", b"?api-version=" + b"9" * 5000,
           b"?api-version=2021-02-01&api-version=2017-01-01", b"?comp=config&type=sharedConfig&incarnation=1",
           b"?%ff=%fe", b"?comp=health&comp=goalstate"]
HEADERS = [b"Metadata: true", b"Metadata: True ", b"Metadata: false", b"metadata:true", b"X-Forwarded-For: 10.0.0.1",
           b"Content-Length: \xc2\xb2", b"Content-Length: " + b"9" * 5000, b"Content-Length: -1", b"Content-Length: 5",
           b"Content-Length: 5, 6", b"Transfer-Encoding: chunked", b"Transfer-Encoding: gzip, chunked",
           b"Host: 168.63.129.16", b"Host: a", b"Host: \x00", b"X-Long: " + b"v" * 70000, b": empty-name",
           b"Bad Header: x", b"X-Folded: a\r\n continued", b"Expect: 100-continue", b"Connection: keep-alive",
           b"X-Ctl: \x1b[2K\x07"]


def _key() -> str:
    pub = ed25519.Ed25519PrivateKey.generate().public_key()
    return pub.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode() + " t@x"


def _health(rng: random.Random, fabric: Fabric) -> bytes:
    container = fabric.identity.container_id if rng.random() < 0.7 else "x\n" + "c" * rng.randrange(100)
    instance = fabric.identity.role_instance_id(fabric.profile.hostname)
    state = rng.choice(["NotReady", "Ready", "Bogus", ""])
    desc = rng.choice(["Provisioning", "line\nforged: the guest agent reported Ready\r\u2028", "d" * 200_000, "&e;"])
    doc = (
        f"<Health><GoalStateIncarnation>1</GoalStateIncarnation><Container><ContainerId>{container}</ContainerId>"
        f"<RoleInstanceList><Role><InstanceId>{instance}</InstanceId><Health><State>{state}</State>"
        f"<Details><SubStatus>Provisioning</SubStatus><Description>{desc}</Description></Details>"
        "</Health></Role></RoleInstanceList></Container></Health>"
    )
    kind = rng.randrange(7)
    if kind == 0:  # a DTD with an entity bomb, in UTF-16
        bomb = '<!DOCTYPE Health [<!ENTITY a "aaaaaaaaaa">' + "".join(
            f'<!ENTITY {n} "{("&" + p + ";") * 10}">' for p, n in zip("abcd", "bcde", strict=True)) + "]>"
        return ('<?xml version="1.0" encoding="UTF-16"?>' + bomb + doc).encode("utf-16")
    if kind == 1:
        enc = rng.choice(["x-nope", "shift_jis", "utf-32", "big5", "utf-7", "cp037"])
        return f'<?xml version="1.0" encoding="{enc}"?>'.encode() + doc.encode()
    if kind == 2:  # deeply nested elements
        depth = rng.randrange(1000, 20000)
        return b"<Health>" + b"<a>" * depth + b"</a>" * depth + b"</Health>"
    if kind == 3:  # a truncated document
        raw = doc.encode()
        return raw[: rng.randrange(len(raw))]
    if kind == 4:
        return b'<!DOCTYPE x SYSTEM "file:///etc/passwd"><Health/>'
    return doc.encode()


def _post(target: bytes, body: bytes, extra: bytes = b"") -> bytes:
    return (b"POST " + target + b" HTTP/1.1\r\nHost: 168.63.129.16\r\n" + extra
            + b"Content-Length: %d\r\n\r\n" % len(body) + body)


def generate(rng: random.Random, fabric: Fabric) -> tuple[str, bytes]:
    """One hostile request for one of the fabric's three services: (service, bytes)."""
    service = rng.choice(["wire", "wire", "hostga", "imds"])
    kind = rng.randrange(12)
    if kind == 0:
        return service, rng.randbytes(rng.randrange(1, 2000))
    if kind == 1:  # an agent request cut short
        req = rng.choice(AGENT_REQUESTS)
        return service, req[: rng.randrange(len(req))]
    if kind == 2:  # an agent request with flipped bytes
        flipped = bytearray(rng.choice(AGENT_REQUESTS))
        for _ in range(rng.randrange(1, 6)):
            flipped[rng.randrange(len(flipped))] = rng.randrange(256)
        return service, bytes(flipped)
    if kind == 3:  # assembled from hostile parts
        line = rng.choice(METHODS) + b" " + rng.choice(PATHS) + rng.choice(QUERIES) + b" " + rng.choice(
            [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/9.9", b"HTTP/1.1 extra", b"", b"HTTP/0.9", b"FOO/1.1"])
        headers = b"".join(h + b"\r\n" for h in rng.sample(HEADERS, rng.randrange(0, 6)))
        return service, line + b"\r\n" + headers + b"\r\n" + rng.randbytes(rng.randrange(0, 20))
    if kind == 4:  # a health report, hostile or not
        return "wire", _post(b"/machine?comp=health", _health(rng, fabric))
    if kind == 5:  # nested or broken JSON status
        depth = rng.randrange(100, 60000)
        body = rng.choice([b'{"content": ' + b"[" * depth + b"]" * depth + b"}", b"{" * depth, b"\xff\xfe{}",
                           b'{"content": "' + b"s" * 100_000 + b'"}', b"[]", b"null"])
        return "hostga", (b"PUT /status HTTP/1.1\r\nHost: 168.63.129.16\r\n"
                          b"Content-Length: %d\r\n\r\n" % len(body) + body)
    if kind == 6:  # IMDS header games
        headers = rng.choice([b"Metadata: true\r\nX-Forwarded-For: 1.2.3.4\r\n",
                              b"Metadata: true\r\nMetadata: false\r\n", b"X-Forwarded-For: \r\nMetadata: true\r\n",
                              b"Metadata:\r\n", b"Metadata: true\r\n"])
        target = rng.choice(PATHS[7:13]) + rng.choice(QUERIES[5:9])
        return "imds", b"GET " + target + b" HTTP/1.1\r\nHost: 169.254.169.254\r\n" + headers + b"\r\n"
    if kind == 7:  # Content-Length lies
        body = rng.randbytes(rng.randrange(0, 100))
        claimed = rng.choice([len(body) + 50, max(0, len(body) - 5), 10**12, 0])
        return service, (b"POST /machine?comp=telemetrydata HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % claimed
                         + body)
    if kind == 8:  # chunked abuse
        chunks = rng.choice([b"5\r\nhello\r\n0\r\n\r\n", b"ffffffffffffffff\r\n", b"-1\r\n", b"5\r\nhel",
                             b"zz\r\n\r\n"])
        return service, (b"POST /machine?comp=telemetrydata HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                         + chunks)
    if kind == 9:  # many or huge headers
        n = rng.choice([99, 150, 1000])
        return service, b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(n)) + b"\r\n"
    if kind == 10:  # telemetry with a real body, kept within a budget
        return "wire", _post(b"/machine?comp=telemetrydata", rng.randbytes(rng.randrange(0, 200_000)))
    return service, rng.choice(AGENT_REQUESTS)


def send(path: Path, data: bytes) -> bytes:
    """Send, half-close, read everything until the server closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(str(path))
        chunks = []
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered from the head and closed while the body was still being sent
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
        return b"".join(chunks)


def judge(answer: bytes) -> str:
    """'closed', or the status class; anything else is a failure."""
    if answer == b"":
        return "closed"
    assert answer.startswith(b"HTTP/1.1 "), answer[:100]
    status = int(answer.split(b" ", 2)[1])
    assert 200 <= status < 300 or 400 <= status < 500 or status == 505, answer[:300]
    return str(status)


def check_well_formed(fabric: Fabric, paths: SocketPaths) -> None:
    gs = send(paths.wire, AGENT_REQUESTS[1])
    assert gs.startswith(b"HTTP/1.1 200 ") and fabric.identity.container_id.encode() in gs
    imds = send(paths.imds, AGENT_REQUESTS[2])
    assert imds.startswith(b"HTTP/1.1 200 ")
    doc = json.loads(imds.split(b"\r\n\r\n", 1)[1])
    assert doc["compute"]["vmId"] == fabric.identity.vm_id and doc["compute"]["name"] == fabric.profile.hostname


async def _burst(path: Path, data: bytes, n: int) -> list[bytes | BaseException]:
    async def one() -> bytes:
        r, w = await asyncio.open_unix_connection(str(path))
        w.write(data)
        w.write_eof()
        answer = await asyncio.wait_for(r.read(), 30)
        w.close()
        return answer

    return await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(self.format(record))


@pytest.fixture
def two_fabrics(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[tuple[Fabric, SocketPaths]]]:
    import tempfile

    fabrics = []
    dirs = []
    try:
        for name, u, ip in (("fuzz-a", uuid.UUID(int=1), "10.0.0.4"), ("fuzz-b", uuid.UUID(int=2), "10.0.0.5")):
            profile = ProvisioningProfile(hostname=name, username="azureuser", ssh_public_keys=(_key(),))
            fabric = Fabric(profile, VMIdentity(u, mac="52:54:00:12:34:56", ip=ip), limits=LIMITS)
            d = Path(tempfile.mkdtemp(prefix="ikz-"))  # short: Unix socket paths are limited to 107 bytes
            dirs.append(d)
            fabrics.append((fabric, fabric.start(d)))
        yield fabrics
    finally:
        for fabric, _ in fabrics:
            fabric.stop()
        for d in dirs:
            for p in d.iterdir():
                p.unlink()
            d.rmdir()


def test_fuzz_hostile_requests(two_fabrics: list[tuple[Fabric, SocketPaths]], capfd: Any) -> None:
    rng = random.Random(SEED)
    errors = _Errors()
    for name in ("imagekit", "asyncio"):
        logging.getLogger(name).addHandler(errors)
    thread_errors: list[str] = []
    old_hook = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        thread_errors.append(f"{args.exc_type.__name__}: {args.exc_value}")

    threading.excepthook = hook
    outcomes: Counter[str] = Counter()
    memory: list[int] = []
    sent = 0
    traced = bool(os.environ.get("IMAGEKIT_FUZZ_TRACEMALLOC"))  # exact, but makes the campaign ~3x slower
    if traced:
        tracemalloc.start()
    try:
        per_phase = max(1, REQUESTS // PHASES)
        for phase in range(PHASES):
            send_one: Callable[[tuple[Path, bytes]], bytes] = lambda item: send(*item)  # noqa: E731
            with ThreadPoolExecutor(max_workers=4) as pool:
                for start in range(0, per_phase, 500):  # generated in slices: the test's own memory stays small
                    batch: list[tuple[Path, bytes]] = []
                    for _ in range(min(500, per_phase - start)):
                        fabric, paths = rng.choice(two_fabrics)
                        service, data = generate(rng, fabric)
                        batch.append((getattr(paths, service), data))
                    for answer in pool.map(send_one, batch):
                        outcomes[judge(answer)] += 1
                    sent += len(batch)
            # 200 clients at once, against one endpoint: every one is answered or cleanly closed.
            fabric, paths = two_fabrics[phase % 2]
            for result in asyncio.run(_burst(paths.wire, AGENT_REQUESTS[0], BURST)):
                assert isinstance(result, bytes), repr(result)
                outcomes[judge(result)] += 1
            sent += BURST
            for fabric, paths in two_fabrics:
                check_well_formed(fabric, paths)
                assert fabric.state.stored_bytes() <= KEPT_BUDGET
            memory.append(tracemalloc.get_traced_memory()[0] if traced else _rss())
    finally:
        if traced:
            tracemalloc.stop()
        threading.excepthook = old_hook
        for name in ("imagekit", "asyncio"):
            logging.getLogger(name).removeHandler(errors)
    captured = capfd.readouterr()
    summary = (f"fuzz: {sent} requests (seed {SEED}), outcomes {dict(outcomes.most_common())}, "
               f"{'traced memory' if traced else 'RSS'} after each phase {[m // 1024 for m in memory]} KiB, "
               f"kept per fabric {[f.state.stored_bytes() for f, _ in two_fabrics]} bytes")
    print(summary)
    with open(os.environ.get("IMAGEKIT_FUZZ_REPORT", os.devnull), "a") as report:
        report.write(summary + "\n")
    assert errors.records == [], errors.records[:3]
    assert thread_errors == [], thread_errors[:3]
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    assert outcomes["closed"] < sent  # the fabric answered, it did not just hang up on everything
    assert memory[-1] - memory[0] <= GROWTH_BUDGET, memory
