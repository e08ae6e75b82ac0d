"""The VM: QEMU's argv, the runner, its private network namespace, SSH, the guest protocol, kept VMs."""
