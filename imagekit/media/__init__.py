"""Provisioning media, the disks and DVD a new VM is given as Azure gives them: the OVF environment
(:mod:`~imagekit.media.ovf`), the UDF/ISO9660 DVD that carries it (:mod:`~imagekit.media.iso`) and the
NTFS resource disk (:mod:`~imagekit.media.resource_disk`). Bytes and files in, files out; no VM."""

from imagekit.media.iso import build_iso_bytes, read_ovf_iso, write_ovf_iso
from imagekit.media.ovf import render_ovf_env
from imagekit.media.resource_disk import create_resource_disk

__all__ = ["build_iso_bytes", "create_resource_disk", "read_ovf_iso", "render_ovf_env", "write_ovf_iso"]
