"""Fetching a file over HTTP(S) into memory, bounded in size and time, and checked before use.

Mirrors come and go and some machines reach none of them, so a failure must be quick (short
timeouts) and cheap (a mirror is abandoned at its first failure); the caller then tries the next
route. Nothing here writes to disk: only verified data ever reaches the cache.
"""

from __future__ import annotations

import hashlib
import http.client
import time
import urllib.error
import urllib.request

from .. import __version__

TIMEOUT_S = 5  # per connection attempt and per read
DEADLINE_S = 300  # a whole file, however slowly it trickles


class DownloadFailed(Exception):
    """One attempt failed; the message says why in a few words, for the summary line."""


def download(url: str, max_bytes: int, *, timeout: float = TIMEOUT_S, deadline: float = DEADLINE_S) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": f"vaecore/{__version__}"})
    name = url.rsplit("/", 1)[-1] or url  # the caller's message already names the mirror
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            chunks, total = [], 0
            while True:
                chunk = response.read(1 << 20)
                if not chunk:
                    break
                total += len(chunk)
                if total > max_bytes:
                    raise DownloadFailed(f"{name} is larger than the expected {max_bytes} bytes")
                if time.monotonic() - started > deadline:
                    raise DownloadFailed(f"{name} took longer than {deadline} s")
                chunks.append(chunk)
    except urllib.error.HTTPError as e:
        raise DownloadFailed(f"{name}: HTTP {e.code}") from None
    except urllib.error.URLError as e:
        raise DownloadFailed(f"{name}: {getattr(e.reason, 'strerror', None) or e.reason}") from None
    except (OSError, ValueError, http.client.HTTPException) as e:  # timeouts, resets, cut-off bodies
        raise DownloadFailed(f"{name}: {e.__class__.__name__} {e}".strip()) from None
    return b"".join(chunks)


def check_digests(data: bytes, name: str, sha256: str, md5: str | None = None):
    """Raises DownloadFailed unless ``data`` has the published digests."""
    got = hashlib.sha256(data).hexdigest()
    if got != sha256:
        raise DownloadFailed(f"{name}: SHA-256 mismatch (expected {sha256[:12]}..., got {got[:12]}...)")
    if md5 is not None and hashlib.md5(data, usedforsecurity=False).hexdigest() != md5:
        raise DownloadFailed(f"{name}: MD5 mismatch with the published sum")
