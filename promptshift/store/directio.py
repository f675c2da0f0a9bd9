"""Writing whole store chunks past the page cache (``O_DIRECT``).

An activation store is written once, in large chunks, and not read back by the process
that writes it. Through the page cache every byte costs the writing thread a copy into
freshly allocated kernel pages, and the kernel's writeback threads more work later: on a
2-core machine that is ~1.4 s of CPU per 0.55 GB, taken from the model's forward passes.
With ``O_DIRECT`` the disk reads the bytes from our buffer: ~0.04 s of CPU for the same
bytes (docs/BENCHMARKS.md, "Direct I/O").

``O_DIRECT`` wants the buffer, the file offset and the length aligned to the device's
block size; chunks are copied into one page-aligned staging buffer per thread (a memcpy,
~200x cheaper than the kernel's page-cache path), written rounded up to 4 KiB, and the
file is truncated to its exact length. A file system that refuses ``O_DIRECT`` (tmpfs,
some FUSE mounts) gets ordinary writes, decided once per device. ``PROMPTSHIFT_DIRECT_IO=0``
turns it off.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading

ALIGN = 4096  # covers 512-byte and 4 KiB logical blocks
MIN_BYTES = 1 << 20  # smaller chunks: the page cache is cheap enough, and metadata dominates

_unsupported: set[int] = set()  # st_dev of file systems that refused O_DIRECT
_local = threading.local()


def enabled() -> bool:
    return hasattr(os, "O_DIRECT") and os.environ.get("PROMPTSHIFT_DIRECT_IO", "1") != "0"


def _staging(n: int) -> memoryview:
    """A page-aligned buffer of at least ``n`` bytes, reused by this thread."""
    buf = getattr(_local, "buf", None)
    if buf is None or len(buf) < n:
        # the old mapping is dropped, not closed: a view of it may still be alive (e.g. in a
        # traceback), and closing a mapping with live views raises
        buf = mmap.mmap(-1, max(n, 1))  # anonymous mappings start on a page boundary
        _local.buf = buf
    return memoryview(buf)


def write_file(path, data: memoryview) -> None:
    """Write ``data`` (bytes) as the whole new file ``path``: directly where the file system
    allows it and the chunk is large, else through the page cache."""
    n = len(data)
    if n >= MIN_BYTES and enabled():
        try:
            dev = os.stat(os.path.dirname(path) or ".").st_dev
        except OSError:
            dev = None
        if dev not in _unsupported and _write_direct(path, data, n):
            return
        if dev is not None:
            _unsupported.add(dev)
    with open(path, "wb") as f:
        f.write(data)


def _write_direct(path, data: memoryview, n: int) -> bool:
    """True when written; False when the file system refused O_DIRECT (nothing to undo:
    the caller rewrites the file from the start)."""
    padded = -(-n // ALIGN) * ALIGN
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
            return False
        raise
    try:
        buf = _staging(padded)
        buf[:n] = data
        buf[n:padded] = bytes(padded - n)
        off = 0
        while off < padded:
            off += os.pwrite(fd, buf[off:padded], off)
        os.ftruncate(fd, n)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
            return False
        raise
    finally:
        os.close(fd)
    return True
