"""Provisioning: boot a base image as a new VM the way Azure does, let its own agent provision it, log in.

    with provision(distro) as pvm:          # imagekit.provision.launch
        pvm.guest.run("systemd-detect-virt")

:mod:`~imagekit.provision.resource_setup` makes each agent's own resource-disk code run under QEMU (and
undoes that test set-up before deprovisioning).
"""

from imagekit.provision.launch import ProvisionedVM, provision

__all__ = ["ProvisionedVM", "provision"]
