"""Reading the arrays of a ``.npz`` without trusting the file: checkpoints, the data cache, users' data.

``np.load`` believes each member's header and allocates the shape it claims, and unpickles object
arrays when allowed. Here each member's header is checked against the archive's own sizes before a
byte of data is allocated, object arrays are refused, and anything damaged becomes one line of the
caller's error class (:class:`~vaecore.errors.DataError`, :class:`~vaecore.errors.CheckpointError`).
"""

from __future__ import annotations

import math
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np

from .errors import reason

# What zipfile and the .npy header parser raise for damaged input (RuntimeError: "encrypted").
DAMAGED = (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, TypeError,
           zlib.error, struct.error, RuntimeError, NotImplementedError)
_DEFLATE_MAX_RATIO = 1100  # deflate expands at most about 1032:1
_CHUNK = 1 << 20


def read_npz_arrays(path: Path, error, keys=None, *, stored_only=False) -> dict[str, np.ndarray]:
    """The ``.npy`` members named in ``keys`` that the archive has (a missing key is simply absent), or
    every member when ``keys`` is None. ``stored_only`` (vaecore's own files, which ``np.savez`` writes
    uncompressed) refuses any member that is not a stored ``.npy``. Raises ``error`` on damage."""
    try:
        zf = zipfile.ZipFile(path)
    except DAMAGED as e:
        raise error(f"{path}: not a readable .npz archive ({reason(e)})") from None
    with zf:
        members = {}
        for info in zf.infolist():
            if stored_only and (not info.filename.endswith(".npy") or info.compress_type != zipfile.ZIP_STORED):
                raise error(f"{path}: unexpected member {info.filename!r} (only uncompressed .npy arrays belong)")
            if info.filename.endswith(".npy"):
                members[info.filename[:-4]] = info
        wanted = members if keys is None else [key for key in keys if key in members]
        return {key: _read_member(path, zf, members[key], error) for key in wanted}


def _read_member(path, zf, info, error) -> np.ndarray:
    where = f"{path}: {info.filename[:-4]}"
    if info.compress_type == zipfile.ZIP_STORED:
        plausible = info.file_size == info.compress_size
    elif info.compress_type == zipfile.ZIP_DEFLATED:
        plausible = info.file_size <= info.compress_size * _DEFLATE_MAX_RATIO + 1024
    else:
        raise error(f"{where} uses an unsupported zip compression (method {info.compress_type})")
    if not plausible:
        raise error(f"{where}: zip entry sizes are inconsistent (corrupt archive)")
    try:
        with zf.open(info) as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise error(f"{where}: unsupported .npy version {version}")
            if dtype.hasobject:
                raise error(f"{where} holds Python objects; only plain numeric arrays are read (no pickles)")
            nbytes = math.prod(shape) * dtype.itemsize
            if f.tell() + nbytes != info.file_size:
                more = " (it claims more data than the file holds)" if f.tell() + nbytes > info.file_size else ""
                raise error(f"{where}: header says {shape} {dtype} but the entry holds a different amount of data"
                            + more)
            buf = bytearray(nbytes)
            view, got = memoryview(buf), 0
            while got < nbytes:  # in chunks: one huge read makes zipfile concatenate bytes repeatedly
                n = f.readinto(view[got : got + _CHUNK])
                if not n:
                    raise error(f"{where}: truncated data")
                got += n
            f.read(1)  # reaching the end makes zipfile check the CRC
    except error:
        raise
    except DAMAGED as e:
        raise error(f"{where}: unreadable ({reason(e)})") from None
    if fortran:
        return np.frombuffer(buf, dtype=dtype).reshape(shape, order="F").copy(order="C")
    return np.frombuffer(buf, dtype=dtype).reshape(shape)
