"""Who a VM is, as the platform sees it: its UUID, NIC and address, and the ids derived from them.

Azure's WireServer and IMDS describe one VM with several identifiers; the emulator derives all of them
from the VM's UUID (the one QEMU gets with ``-uuid``) so that they agree with each other and with what
the agents compute inside the guest:

- ``vm_id`` (IMDS ``compute.vmId``): on a Gen1 (BIOS) VM Azure's SMBIOS 2.3 table makes Linux read the
  first three UUID fields byte-swapped, so the vmId is the *byte-swapped* SMBIOS UUID; on Gen2 (UEFI) it is
  the UUID itself. cloud-init computes it the same way (``sources/azure/identity.py``
  ``convert_system_uuid_to_vm_id``), so a VM booted with ``-uuid U`` and no UEFI gets vmId
  ``bytes_le(U)``.
- ``container_id``, ``role_instance_id`` and ``role_config_name`` (goal state): stable per VM, derived
  from the vmId (uuid5 for the container), shaped like Azure's (``<vmId>._<name>``).
"""

from __future__ import annotations

import ipaddress
import re
import uuid
from dataclasses import dataclass, field

from imagekit.core.errors import InputError

_MAC_RE = re.compile(r"^[0-9A-Fa-f]{2}([:-]?)[0-9A-Fa-f]{2}(\1[0-9A-Fa-f]{2}){4}$")
# A fixed namespace so that the container id is a pure function of the vmId (no hidden state).
_CONTAINER_NS = uuid.UUID("6f1c3a52-0b7e-4f0c-9a53-2f6a8b0d4e11")


def _normalize_mac(mac: str) -> str:
    if not _MAC_RE.match(mac):
        raise InputError(
            f"invalid NIC MAC address {mac!r}",
            hint="give six hex octets, e.g. 52:54:00:12:34:56 (colons, dashes or none)",
        )
    return re.sub(r"[:-]", "", mac).upper()


@dataclass(frozen=True)
class VMIdentity:
    """The platform-side identity of one VM.

    ``vm_uuid`` is the SMBIOS system UUID (QEMU ``-uuid``); ``mac`` the guest NIC's MAC in any common
    notation; ``ip`` the guest's IPv4 address and ``prefix_len`` its subnet prefix; ``uefi`` whether the
    VM boots with UEFI (Azure Gen2), which decides the vmId byte order.
    """

    vm_uuid: uuid.UUID
    mac: str
    ip: str
    prefix_len: int = 24
    uefi: bool = False
    location: str = "local"
    vm_size: str = "Standard_D2s_v3"
    _mac: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.vm_uuid, uuid.UUID):
            try:
                object.__setattr__(self, "vm_uuid", uuid.UUID(str(self.vm_uuid)))
            except ValueError as exc:
                raise InputError(f"invalid VM UUID {self.vm_uuid!r}", hint="give an RFC 4122 UUID") from exc
        object.__setattr__(self, "_mac", _normalize_mac(self.mac))
        try:
            addr = ipaddress.IPv4Address(self.ip)
        except ValueError as exc:
            raise InputError(f"invalid guest IPv4 address {self.ip!r}", hint="e.g. 10.0.0.4") from exc
        if not 1 <= self.prefix_len <= 32:
            raise InputError(f"invalid prefix length {self.prefix_len}", hint="allowed: 1 to 32")
        object.__setattr__(self, "ip", str(addr))

    @property
    def mac_imds(self) -> str:
        """The MAC as IMDS writes it: twelve upper-case hex digits, no separators."""
        return self._mac

    @property
    def mac_colon(self) -> str:
        """The MAC as QEMU and Linux write it: lower case with colons."""
        m = self._mac.lower()
        return ":".join(m[i : i + 2] for i in range(0, 12, 2))

    @property
    def subnet(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Interface(f"{self.ip}/{self.prefix_len}").network

    @property
    def vm_id(self) -> str:
        """IMDS ``compute.vmId`` as the agents inside this VM compute it (see the module docstring)."""
        if self.uefi:
            return str(self.vm_uuid)
        return str(uuid.UUID(bytes=self.vm_uuid.bytes_le))

    @property
    def container_id(self) -> str:
        return str(uuid.uuid5(_CONTAINER_NS, self.vm_id))

    def role_instance_id(self, hostname: str) -> str:
        return f"{self.vm_id}._{hostname}"

    def role_config_name(self, hostname: str) -> str:
        # waagent's HostGAPlugin takes the deployment id from the part before the first dot.
        return f"{self.vm_id}.0.{self.vm_id}._{hostname}.1.xml"
