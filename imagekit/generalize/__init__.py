"""Generalizing a provisioned guest before capture (:func:`~imagekit.generalize.deprovision.deprovision`):
the distro table's commands, then imagekit's own steps, each step's claims checked in the guest."""

from imagekit.generalize.deprovision import DeprovisionReport, deprovision

__all__ = ["DeprovisionReport", "deprovision"]
