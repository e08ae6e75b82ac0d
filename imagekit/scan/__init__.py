"""The offline leak scan: a captured image's partitions mounted read-only and searched for what must not ship.

    findings = scan_image(Path("disk.vhd"), "vpc", ScanInput(usernames=["azureuser"]))
    check_image(...)   # the same, raising LeakFound when anything is found

:mod:`imagekit.scan.image` finds and mounts the partitions; :mod:`imagekit.scan.rules` holds the rules.
"""

from imagekit.scan.image import LeakFound, Partition, check_image, find_partitions, fstab_mounts, scan_image
from imagekit.scan.rules import Finding, ScanInput, scan_tree

__all__ = ["Finding", "LeakFound", "Partition", "ScanInput", "check_image", "find_partitions", "fstab_mounts",
           "scan_image", "scan_tree"]
