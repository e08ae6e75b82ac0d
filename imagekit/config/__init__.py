"""Configuration: the distro table and the provisioning profile (what a VM is asked to be)."""
