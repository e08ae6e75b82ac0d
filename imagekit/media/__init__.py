"""Provisioning media: the OVF environment, the ISO that carries it, the NTFS resource disk."""
