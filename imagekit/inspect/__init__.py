"""Bring your own image: read an image file from any tool, offline and read-only, never booting it.

    report = inspect_image(Path("disk.vhd"))    # format, partitions, boot modes, OS, agents, kernels, problems
    print(render(report))
    result = scan_file(Path("disk.qcow2"))      # the offline leak scan of that file

:mod:`imagekit.inspect.source` opens the file (format, VHD footer, a raw view, partitions),
:mod:`imagekit.inspect.worker` reads its file systems in a private mount namespace,
:mod:`imagekit.inspect.parse` holds the parsers, :mod:`imagekit.inspect.report` the diagnosis.
Uses :mod:`imagekit.scan`, :mod:`imagekit.config` and :mod:`imagekit.core`.
"""

from imagekit.inspect.report import inspect_image, render
from imagekit.inspect.scanfile import ScanResult, scan_file
from imagekit.inspect.source import ImageInfo, open_disk, probe

__all__ = ["ImageInfo", "ScanResult", "inspect_image", "open_disk", "probe", "render", "scan_file"]
