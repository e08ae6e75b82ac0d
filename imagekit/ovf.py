"""The provisioning profile: what Azure tells a new VM through ovf-env.xml.

(Validation and rendering are added by the OVF work; the fields below are the contract other modules
rely on.)
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ProvisioningProfile:
    hostname: str
    username: str
    ssh_public_keys: tuple[str, ...]
    password: str | None = field(default=None, repr=False)
    custom_data: bytes | None = field(default=None, repr=False)
    disable_password_auth: bool = True
    provision_guest_agent: bool = True
