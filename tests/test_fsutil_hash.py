"""fsutil.sha256_file: the streamed hash equals hashlib's of the whole bytes at every chunk boundary."""

from __future__ import annotations

import hashlib
import os

import pytest

from gpubake.fsutil import sha256_file


@pytest.mark.parametrize("size", [0, 1, 63, 64, 65, 3 * 64 + 5])
def test_streamed_hash_is_the_whole_files_hash(tmp_path, size):
    data = os.urandom(size)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    assert sha256_file(path, chunk_size=64) == hashlib.sha256(data).hexdigest()
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()  # the default 16 MiB chunk
