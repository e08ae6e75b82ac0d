"""The DNS answers Azure's resolver at 168.63.129.16 gives a VM about itself, as a pure function.

Azure's DNS resolves a VM's own name inside its virtual network. On a VM without custom DNS the DHCP
lease carries a search domain ``<random>.<region>.internal.cloudapp.net``; the classic (pre-VNet)
suffix was ``reddog.microsoft.com``. Guests here get no search domain from the emulated DHCP, so they
ask for the bare host name (``sudo`` resolving ``hostname``); the FQDN under the fixed suffix
:data:`AZURE_DNS_SUFFIX` (``internal.cloudapp.net``) is answered as well, for tools that qualify it.
The VM-runner's namespace relay hands each UDP query to :func:`dns_answer` and sends back what it returns.

Only the VM's own names are answered: everything else is NXDOMAIN (there is no upstream resolver — the
VM has no route out, by design). Malformed queries get FORMERR when the header is readable, otherwise
nothing; responses sent to us are dropped so two resolvers can never loop.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Mapping

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.reversename
import dns.rrset

from imagekit.core.errors import InputError

AZURE_DNS_SUFFIX = "internal.cloudapp.net"
TTL = 10  # Azure's resolver hands out short TTLs for VM records
_HEADER = struct.Struct("!HHHHHH")
_QR = 0x8000


def dns_names(hostname: str, ip: str) -> dict[str, str]:
    """The names one VM resolves to its own address: the host name and its Azure-internal FQDN."""
    host = hostname.rstrip(".").lower()
    return {host: ip, f"{host}.{AZURE_DNS_SUFFIX}": ip}


def _formerr(query: bytes) -> bytes | None:
    if len(query) < _HEADER.size:
        return None  # not even an id to answer to
    qid, flags = struct.unpack("!HH", query[:4])
    if flags & _QR:
        return None
    opcode_bits = flags & 0x7800
    rd = flags & 0x0100
    return _HEADER.pack(qid, _QR | opcode_bits | rd | dns.rcode.FORMERR, 0, 0, 0, 0)


def _normalize(names: Mapping[str, str]) -> dict[str, ipaddress.IPv4Address]:
    table: dict[str, ipaddress.IPv4Address] = {}
    for name, ip in names.items():
        try:
            table[name.rstrip(".").lower()] = ipaddress.IPv4Address(ip)
        except ValueError as exc:
            raise InputError(f"DNS name {name!r} maps to {ip!r}, which is not an IPv4 address") from exc
    return table


def dns_answer(query: bytes, names: Mapping[str, str]) -> bytes | None:
    """The wire-format answer to one DNS query over UDP, or ``None`` to send nothing.

    ``names`` maps host names (case-insensitive, with or without the final dot) to IPv4 addresses.
    A and ANY queries for a known name get its address; PTR queries for a known address get the longest
    name that maps to it; other types for a known name get an empty NOERROR answer; unknown names get
    NXDOMAIN; non-QUERY opcodes NOTIMP; non-IN classes REFUSED.
    """
    table = _normalize(names)
    try:
        msg = dns.message.from_wire(query)
    except (dns.exception.DNSException, ValueError, IndexError, struct.error):
        return _formerr(query)
    if msg.flags & dns.flags.QR:
        return None
    response = dns.message.make_response(msg)
    response.flags |= dns.flags.RA
    if msg.opcode() != dns.opcode.QUERY:
        response.set_rcode(dns.rcode.NOTIMP)
        return response.to_wire()
    if len(msg.question) != 1:
        response.set_rcode(dns.rcode.FORMERR)
        return response.to_wire()
    question = msg.question[0]
    if question.rdclass != dns.rdataclass.IN:
        response.set_rcode(dns.rcode.REFUSED)
        return response.to_wire()
    qname = question.name.to_text(omit_final_dot=True).lower()

    if question.rdtype == dns.rdatatype.PTR:
        try:
            addr = dns.reversename.to_address(question.name)
        except (dns.exception.DNSException, ValueError):
            addr = None
        targets = sorted((n for n, ip in table.items() if addr is not None and str(ip) == addr), key=len)
        if not targets:
            response.set_rcode(dns.rcode.NXDOMAIN)
            return response.to_wire()
        response.flags |= dns.flags.AA
        response.answer.append(dns.rrset.from_text(question.name, TTL, "IN", "PTR", targets[-1] + "."))
        return response.to_wire()

    ip = table.get(qname)
    if ip is None:
        response.set_rcode(dns.rcode.NXDOMAIN)
        return response.to_wire()
    response.flags |= dns.flags.AA
    if question.rdtype in (dns.rdatatype.A, dns.rdatatype.ANY):
        response.answer.append(dns.rrset.from_text(question.name, TTL, "IN", "A", str(ip)))
    return response.to_wire()
