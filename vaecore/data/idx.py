"""IDX files (the format MNIST is distributed in), read without trusting their headers.

An IDX header states the array's shape, and a naive reader allocates that much before looking at
the data: a corrupt 100-byte file claiming 2**31 images would ask for gigabytes. Here the size the
header promises is compared with what the file can hold *before* allocating, and the data read must
match it exactly, so a truncated or mislabelled file is a one-line :class:`DataError` naming it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import zlib
from pathlib import Path

import numpy as np

from ..errors import DataError

# IDX type byte -> element type (big-endian, as the format specifies).
IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
UBYTE = 0x08
# Deflate cannot expand more than about 1032:1, so a gzip file of n bytes holds at most this much.
_GZIP_MAX_RATIO = 1100
_CHUNK = 1 << 22


def read_idx(path) -> np.ndarray:
    """The array in an IDX file, gzipped or raw (recognised by content, not by name)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            return read_idx_stream(f, size, path.name)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


def read_idx_bytes(data: bytes, name: str) -> np.ndarray:
    """The same as :func:`read_idx` for a file already in memory (a download)."""
    return read_idx_stream(io.BytesIO(data), len(data), name)


def read_idx_stream(f, size: int, name: str) -> np.ndarray:
    start = f.read(2)
    f.seek(0)
    if start == b"\x1f\x8b":
        stream = gzip.GzipFile(fileobj=f, mode="rb")
        limit = size * _GZIP_MAX_RATIO
        try:
            return _parse(stream, name, max_payload=limit, exact=False)
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise DataError(f"{name}: corrupt or truncated gzip data ({e})") from None
    return _parse(f, name, max_payload=size, exact=True)


def _parse(f, name, *, max_payload, exact) -> np.ndarray:
    magic = f.read(4)
    if len(magic) < 4:
        raise DataError(f"{name}: truncated IDX file ({len(magic)} bytes, the header alone needs 4)")
    zero, type_code, ndim = magic[:2], magic[2], magic[3]
    if zero != b"\0\0" or type_code not in IDX_TYPES or ndim == 0:
        raise DataError(f"{name}: not an IDX file (magic number 0x{magic.hex()})")
    dims_raw = f.read(4 * ndim)
    if len(dims_raw) < 4 * ndim:
        raise DataError(f"{name}: truncated IDX header ({ndim} dimensions declared)")
    shape = tuple(int.from_bytes(dims_raw[i : i + 4], "big") for i in range(0, 4 * ndim, 4))
    dtype = np.dtype(IDX_TYPES[type_code])
    header = 4 + 4 * ndim
    nbytes = math.prod(shape) * dtype.itemsize
    if math.prod(d for d in shape if d) * dtype.itemsize >= 2**62:  # even an empty array must be describable
        raise DataError(f"{name}: impossible dimensions {_shape(shape)}")
    available = max_payload - header if exact else max_payload
    if nbytes > available:
        held = f"holds {available} bytes of data" if exact else f"is {max_payload // _GZIP_MAX_RATIO} bytes compressed"
        raise DataError(f"{name}: truncated: its header promises {_shape(shape)} ({nbytes} bytes) but the file {held}")
    if exact and nbytes < available:
        raise DataError(f"{name}: {available - nbytes} bytes longer than its header {_shape(shape)} says")

    if exact:  # the size was checked against the file, so allocating it is safe
        buf = bytearray(nbytes)
        got = f.readinto(buf) if nbytes else 0
    else:  # a gzip stream's true length is unknown: grow only as data actually arrives
        buf = bytearray()
        while len(buf) < nbytes:
            chunk = f.read(min(_CHUNK, nbytes - len(buf)))
            if not chunk:
                break
            buf += chunk
        got = len(buf)
    if got < nbytes:
        raise DataError(f"{name}: truncated: its header promises {nbytes} bytes of data, found {got}")
    if f.read(1):
        raise DataError(f"{name}: longer than its header {_shape(shape)} says")
    return np.frombuffer(buf, dtype=dtype).reshape(shape)


def idx_header(type_code: int, shape) -> bytes:
    return bytes([0, 0, type_code, len(shape)]) + b"".join(int(d).to_bytes(4, "big") for d in shape)


def idx_sha256(array: np.ndarray, type_code: int = UBYTE) -> str:
    """SHA-256 of the raw IDX file that holds ``array``: how data from any route is checked
    against the published checksums of the original files, without writing that file."""
    h = hashlib.sha256(idx_header(type_code, array.shape))
    h.update(np.ascontiguousarray(array, dtype=IDX_TYPES[type_code]).data)
    return h.hexdigest()


def images_from_idx(array: np.ndarray, name: str) -> np.ndarray:
    """IDX images ``(N, H, W)`` as ``(N, 1, H, W)`` uint8; anything else is the wrong file."""
    if array.ndim != 3:
        hint = " (is it a labels file?)" if array.ndim == 1 else ""
        raise DataError(f"{name}: expected images with 3 dimensions (N, H, W), found {_shape(array.shape)}{hint}")
    if array.dtype != np.uint8:
        raise DataError(f"{name}: expected unsigned-byte pixels, found {array.dtype.name}")
    if 0 in array.shape:
        raise DataError(f"{name}: holds no pixels ({_shape(array.shape)})")
    return np.ascontiguousarray(array[:, None, :, :])


def labels_from_idx(array: np.ndarray, name: str, count: int, images_name: str) -> np.ndarray:
    if array.ndim != 1:
        hint = " (is it an images file?)" if array.ndim == 3 else ""
        raise DataError(f"{name}: expected labels with 1 dimension, found {_shape(array.shape)}{hint}")
    if array.dtype.kind not in "iu":
        raise DataError(f"{name}: expected integer labels, found {array.dtype.name}")
    if len(array) != count:
        raise DataError(f"{name}: has {len(array)} labels but {images_name} has {count} images")
    if len(array) and array.min() < 0:
        raise DataError(f"{name}: has negative labels")
    return array.astype(np.int64)


def _shape(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"
