"""Chunk files written past the page cache hold exactly the bytes given, whatever their
length; a file system that refuses O_DIRECT gets ordinary writes, and so does an opt-out."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from promptshift.store import directio


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.setattr(directio, "_unsupported", set())
    monkeypatch.delenv("PROMPTSHIFT_DIRECT_IO", raising=False)


def _payload(n: int, seed: int = 0) -> memoryview:
    return memoryview(np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes())


@pytest.mark.parametrize("n", [directio.MIN_BYTES, directio.MIN_BYTES + 1, 3 * directio.MIN_BYTES + 4095])
def test_direct_write_is_exact(tmp_path, n):
    if not directio.enabled():
        pytest.skip("no O_DIRECT on this platform")
    data = _payload(n, n)
    path = tmp_path / "chunk"
    path.write_bytes(b"x" * (n + 9000))  # an older, longer file is replaced whole
    if not directio._write_direct(str(path), data, n):
        pytest.skip(f"the file system under {tmp_path} refuses O_DIRECT")
    assert path.read_bytes() == data.tobytes()
    # and through the public entry point, twice in a row (the staging buffer is reused)
    for seed in (1, 2):
        d = _payload(n, seed)
        directio.write_file(str(path), d)
        assert path.read_bytes() == d.tobytes()
    assert not directio._unsupported
    # a larger chunk after a smaller one grows the staging buffer, even with a view of the old one alive
    held = directio._staging(1)
    bigger = _payload(n + directio.ALIGN * 3, 3)
    directio.write_file(str(path), bigger)
    assert path.read_bytes() == bigger.tobytes() and len(held) >= 1


def test_refused_o_direct_falls_back_once_per_device(tmp_path, monkeypatch):
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this platform")
    calls = []
    real_open = os.open

    def refusing_open(path, flags, *a, **k):
        if flags & os.O_DIRECT:
            calls.append(path)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", refusing_open)
    n = directio.MIN_BYTES + 123
    for i in range(3):
        d = _payload(n, i)
        directio.write_file(str(tmp_path / f"c{i}"), d)
        assert (tmp_path / f"c{i}").read_bytes() == d.tobytes()
    assert len(calls) == 1  # asked once; the device is then remembered as unsupported
    assert os.stat(tmp_path).st_dev in directio._unsupported


def test_opt_out_and_small_chunks_use_the_page_cache(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(directio, "_write_direct", lambda *a: seen.append(a) or True)
    small = _payload(1000)
    directio.write_file(str(tmp_path / "small"), small)
    assert (tmp_path / "small").read_bytes() == small.tobytes() and not seen
    monkeypatch.setenv("PROMPTSHIFT_DIRECT_IO", "0")
    big = _payload(directio.MIN_BYTES)
    directio.write_file(str(tmp_path / "big"), big)
    assert (tmp_path / "big").read_bytes() == big.tobytes() and not seen
