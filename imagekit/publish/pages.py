"""Which parts of a fixed VHD a page blob needs: the data extents (``SEEK_DATA``/``SEEK_HOLE``) less their
all-zero 512-byte pages, as page-aligned ranges of at most 4 MiB (Put Page's limit).

A page blob reads as zeros wherever no page was written, so holes and zero pages are never sent.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from imagekit.capture import _data_extents

PAGE = 512
MAX_REQUEST = 4 * 1024 * 1024  # Put Page's largest body
_READ = 4 * 1024 * 1024
_BLOCK = 64 * 1024  # zero test granularity before the per-page test
_ZERO_BLOCK = bytes(_BLOCK)
_ZERO_PAGE = bytes(PAGE)


@dataclass(frozen=True, order=True)
class Range:
    """Bytes ``start`` to ``end`` (exclusive) of the file; both multiples of 512."""

    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Plan:
    """What an upload of one file sends: its size, its data extents and the non-zero ranges."""

    size: int
    extent_bytes: int  # bytes in the file's data extents (what SEEK_DATA finds)
    ranges: tuple[Range, ...]  # non-zero pages, merged, split at MAX_REQUEST

    @property
    def data_bytes(self) -> int:
        return sum(r.length for r in self.ranges)


def _nonzero_runs(buf: memoryview, base: int) -> Iterator[tuple[int, int]]:
    """(start, end) file offsets of the runs of non-zero 512-byte pages in ``buf`` (which starts at ``base``)."""
    run_start = -1
    n = len(buf)
    off = 0
    while off < n:
        block = buf[off:off + _BLOCK]
        if len(block) == _BLOCK and block == _ZERO_BLOCK:
            if run_start >= 0:
                yield base + run_start, base + off
                run_start = -1
            off += _BLOCK
            continue
        end = min(off + len(block), n)
        for p in range(off, end, PAGE):
            page = buf[p:p + PAGE]
            zero = page == _ZERO_PAGE[:len(page)]
            if zero and run_start >= 0:
                yield base + run_start, base + p
                run_start = -1
            elif not zero and run_start < 0:
                run_start = p
        off = end
    if run_start >= 0:
        yield base + run_start, base + n


def merge(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, adjacent and overlapping ranges joined."""
    out: list[tuple[int, int]] = []
    for s, e in sorted(ranges):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def split(ranges: Iterable[tuple[int, int]], limit: int = MAX_REQUEST) -> list[Range]:
    out = []
    for s, e in ranges:
        while s < e:
            n = min(limit, e - s)
            out.append(Range(s, s + n))
            s += n
    return out


def plan(path: Path, limit: int = MAX_REQUEST) -> Plan:
    """Read ``path``'s data extents once and return the ranges an upload sends."""
    if limit % PAGE or limit <= 0 or limit > MAX_REQUEST:
        raise ValueError(f"request size {limit} must be a positive multiple of {PAGE} up to {MAX_REQUEST}")
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        runs: list[tuple[int, int]] = []
        extent_bytes = 0
        for start, end in _data_extents(fd, size):
            extent_bytes += end - start
            pos = start - start % PAGE
            stop = min(size, end + (-end) % PAGE)
            while pos < stop:
                n = min(_READ, stop - pos)
                buf = os.pread(fd, n, pos)
                if len(buf) != n:
                    raise OSError(f"{path}: short read at {pos} (the file changed while being read)")
                runs.extend(_nonzero_runs(memoryview(buf), pos))
                pos += n
    finally:
        os.close(fd)
    return Plan(size=size, extent_bytes=extent_bytes, ranges=tuple(split(merge(runs), limit)))


def covered(r: Range, existing: list[tuple[int, int]]) -> bool:
    """Whether ``r`` lies wholly inside one of the (merged, sorted) ``existing`` ranges."""
    import bisect

    i = bisect.bisect_right(existing, r.start, key=lambda x: x[0]) - 1
    return i >= 0 and existing[i][0] <= r.start and r.end <= existing[i][1]
