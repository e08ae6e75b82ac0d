"""Provisioning: a VM booted the way Azure boots it, its agent provisioning it, a login."""
