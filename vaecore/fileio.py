"""Writing files so that a crash never leaves a half-written one behind.

Every file vaecore produces is written to a temporary file in the destination folder and renamed
over the target: readers see either the old version or the new one, never a mix.
"""

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import VaecoreError


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp makes files private (0600); the files we write are ordinary outputs, so follow the umask.
FILE_MODE = 0o666 & ~_umask()


@contextmanager
def atomic_path(path, suffix=""):
    """Yields a temporary path beside ``path``; on success it replaces ``path`` atomically.

    ``suffix`` keeps the extension for libraries that choose a format by it (Pillow, NumPy).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or path.suffix, dir=path.parent)
    except OSError as e:
        raise VaecoreError(f"cannot write to {path.parent}: {e.strerror or e}") from None
    os.close(fd)
    try:
        os.chmod(tmp, FILE_MODE)
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_bytes(path, data: bytes):
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path, text: str):
    atomic_write_bytes(path, text.encode("utf-8"))
