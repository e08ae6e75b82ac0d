"""The OVF environment (``ovf-env.xml``) for a provisioning profile: Jinja2 over ``templates/ovf``, every
value XML-escaped, undefined variables an error, the result re-parsed before it is returned.
:mod:`imagekit.media.iso` puts it on the provisioning DVD."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import jinja2

from imagekit.config.profile import ProvisioningProfile
from imagekit.core.errors import InputError
from imagekit.core.paths import TEMPLATES_DIR

TEMPLATE_NAME = "ovf-env.xml.j2"


def render_ovf_env(profile: ProvisioningProfile) -> str:
    """Render ``templates/ovf/ovf-env.xml.j2`` for ``profile`` (Jinja2, StrictUndefined, XML-escaped).

    The result is re-parsed before it is returned, and a document whose ProvisionGuestAgent is empty (which
    waagent rejects) is never returned.
    """
    env = template_environment()
    # Re-validate: a frozen dataclass can still be forged with object.__setattr__.
    profile.validate()
    text = env.get_template(TEMPLATE_NAME).render(
        hostname=profile.hostname,
        username=profile.username,
        password=profile.password,
        disable_password_auth=_xml_bool(profile.disable_password_auth),
        public_keys=[
            {"fingerprint": k.fingerprint, "path": profile.authorized_keys_path, "value": k.openssh}
            for k in profile.ssh_keys
        ],
        custom_data=profile.custom_data_b64,
        provision_guest_agent=_xml_bool(profile.provision_guest_agent),
    )
    root = ET.fromstring(text.encode("utf-8"))
    pga = root.find(f".//{{{WA_NS}}}PlatformSettings/{{{WA_NS}}}ProvisionGuestAgent")
    if pga is None or (pga.text or "").strip() not in ("true", "false"):
        raise InputError("ovf-env.xml: ProvisionGuestAgent came out empty; waagent would reject the ISO")
    return text


def template_environment() -> jinja2.Environment:
    """The Jinja2 environment for ``templates/ovf``: undefined variables raise, every value is XML-escaped."""
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR / "ovf"),
        undefined=jinja2.StrictUndefined,
        autoescape=True,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )


OVF_NS = "http://schemas.dmtf.org/ovf/environment/1"
WA_NS = "http://schemas.microsoft.com/windowsazure"


def _xml_bool(value: bool) -> str:
    if not isinstance(value, bool):
        raise TypeError(f"expected bool, got {type(value).__name__}")
    return "true" if value else "false"
