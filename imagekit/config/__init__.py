"""Configuration: what a build is asked to make. The distro table (:mod:`~imagekit.config.distros`: one
validated, frozen :class:`~imagekit.config.distros.Distro` per ``distros/*.toml``, resolved once at the
edge and passed down) and the provisioning profile (:mod:`~imagekit.config.profile`: host name, user,
keys, password, custom data, validated as Azure validates ``osProfile``)."""

from imagekit.config.distros import Agent, Distro, Family, SourceKind
from imagekit.config.profile import ProvisioningProfile

__all__ = ["Agent", "Distro", "Family", "ProvisioningProfile", "SourceKind"]
