"""IDX files and folders: exact round trips, and every malformed file is a one-line error naming it."""

import gzip
import struct
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vaecore.data import load_dataset
from vaecore.data.idx import read_idx, read_idx_bytes
from vaecore.errors import DataError


def idx_bytes(array: np.ndarray) -> bytes:
    """A tiny IDX writer, independent of the reader under test."""
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D}
    header = struct.pack(">BBBB", 0, 0, codes[array.dtype], array.ndim)
    return header + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_idx_folder(folder, x_train, y_train, x_test=None, y_test=None, gz=True):
    folder.mkdir(parents=True, exist_ok=True)
    parts = {"train-images-idx3-ubyte": x_train, "train-labels-idx1-ubyte": y_train,
             "t10k-images-idx3-ubyte": x_test, "t10k-labels-idx1-ubyte": y_test}
    for name, array in parts.items():
        if array is None:
            continue
        data = idx_bytes(array)
        (folder / (name + ".gz" if gz else name)).write_bytes(gzip.compress(data) if gz else data)
    return folder


def assert_one_line_error(excinfo, name):
    message = str(excinfo.value)
    assert "\n" not in message
    assert name in message


rng = np.random.default_rng(0)
IMAGES = rng.integers(0, 256, size=(7, 5, 4), dtype=np.uint8)
LABELS = rng.integers(0, 10, size=7, dtype=np.uint8)


@pytest.mark.parametrize("array", [IMAGES, LABELS, np.arange(24, dtype=">i4").reshape(2, 3, 4),
                                   np.linspace(0, 1, 6, dtype=">f4").reshape(2, 3)])
@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip_is_exact(tmp_path, array, gz):
    data = idx_bytes(array)
    path = tmp_path / "some-idx-file"
    path.write_bytes(gzip.compress(data) if gz else data)
    back = read_idx(path)
    assert back.shape == array.shape
    np.testing.assert_array_equal(back, array)


def test_idx_folder_loads_train_and_test_with_labels(tmp_path):
    folder = write_idx_folder(tmp_path / "digits", IMAGES, LABELS, IMAGES[:3], LABELS[:3])
    ds = load_dataset(str(folder), log=lambda m: None)
    assert ds.name == "digits" and "IDX folder" in ds.origin
    assert ds.x_train.shape == (7, 1, 5, 4) and ds.x_train.dtype == np.uint8
    np.testing.assert_array_equal(ds.x_train[:, 0], IMAGES)
    np.testing.assert_array_equal(ds.y_train, LABELS.astype(np.int64))
    assert ds.y_train.dtype == np.int64 and ds.x_test.shape == (3, 1, 5, 4)


def test_idx_folder_reads_raw_files_and_dotted_names(tmp_path):
    folder = tmp_path / "raw"
    folder.mkdir()
    (folder / "train-images.idx3-ubyte").write_bytes(idx_bytes(IMAGES))
    (folder / "t10k-images.idx3-ubyte").write_bytes(idx_bytes(IMAGES[:2]))
    ds = load_dataset(str(folder), log=lambda m: None)
    assert ds.x_train.shape == (7, 1, 5, 4) and ds.y_train is None


def test_idx_folder_without_test_files_splits_80_20_with_the_seed(tmp_path):
    folder = write_idx_folder(tmp_path / "d", IMAGES, LABELS)
    a = load_dataset(str(folder), seed=1, log=lambda m: None)
    b = load_dataset(str(folder), seed=1, log=lambda m: None)
    assert len(a.x_train) + len(a.x_test) == 7 and len(a.x_test) == 1
    np.testing.assert_array_equal(a.x_train, b.x_train)
    # labels travel with their images through the split
    for x, y in zip(a.x_train[:, 0], a.y_train):
        i = next(i for i in range(7) if np.array_equal(IMAGES[i], x))
        assert LABELS[i] == y


def test_truncated_idx_names_the_file(tmp_path):
    folder = write_idx_folder(tmp_path / "d", IMAGES, LABELS, gz=False)
    path = folder / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataError) as e:
        load_dataset(str(folder), log=lambda m: None)
    assert_one_line_error(e, "train-images-idx3-ubyte")
    assert "truncated" in str(e.value)


def test_truncated_gzip_idx_names_the_file(tmp_path):
    folder = write_idx_folder(tmp_path / "d", IMAGES, LABELS)
    path = folder / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(DataError) as e:
        load_dataset(str(folder), log=lambda m: None)
    assert_one_line_error(e, "train-images-idx3-ubyte.gz")


def test_labels_file_in_the_images_slot_is_called_mislabelled(tmp_path):
    folder = write_idx_folder(tmp_path / "d", LABELS, LABELS)
    with pytest.raises(DataError) as e:
        load_dataset(str(folder), log=lambda m: None)
    assert_one_line_error(e, "train-images-idx3-ubyte.gz")
    assert "labels file" in str(e.value)


def test_label_count_must_match_image_count(tmp_path):
    folder = write_idx_folder(tmp_path / "d", IMAGES, LABELS[:6])
    with pytest.raises(DataError) as e:
        load_dataset(str(folder), log=lambda m: None)
    assert_one_line_error(e, "train-labels-idx1-ubyte.gz")
    assert "6 labels" in str(e.value) and "7 images" in str(e.value)


def test_header_claiming_2_31_images_in_a_100_byte_file_fails_without_allocating(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes((struct.pack(">BBBBIII", 0, 0, 8, 3, 2**31, 28, 28) + bytes(100))[:100])
    tracemalloc.start()
    try:
        with pytest.raises(DataError) as e:
            read_idx(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert_one_line_error(e, "train-images-idx3-ubyte")
    assert peak < 1 << 20


def test_gzip_header_claiming_huge_dimensions_fails_without_allocating():
    data = gzip.compress(struct.pack(">BBBBIII", 0, 0, 8, 3, 2**32 - 1, 2**32 - 1, 2**32 - 1) + bytes(64))
    tracemalloc.start()
    try:
        with pytest.raises(DataError) as e:
            read_idx_bytes(data, "huge.gz")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert_one_line_error(e, "huge.gz")
    assert peak < 1 << 20


@pytest.mark.parametrize("gz", [False, True])
def test_every_truncation_of_a_valid_file_is_a_one_line_error(gz):
    full = idx_bytes(IMAGES)
    data = gzip.compress(full) if gz else full
    for cut in range(len(data)):
        with pytest.raises(DataError) as e:
            read_idx_bytes(data[:cut], "cut-file")
        assert_one_line_error(e, "cut-file")


def test_trailing_bytes_are_reported():
    with pytest.raises(DataError) as e:
        read_idx_bytes(idx_bytes(IMAGES) + b"\0", "long-file")
    assert_one_line_error(e, "long-file")
    assert "longer" in str(e.value)


headers = st.tuples(
    st.binary(min_size=2, max_size=2) | st.just(b"\0\0"),
    st.sampled_from([0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E]) | st.integers(0, 255),
    st.integers(0, 6),
).flatmap(lambda h: st.tuples(
    st.just(h), st.lists(st.integers(0, 2**32 - 1) | st.integers(0, 8), min_size=h[2], max_size=h[2]),
    st.binary(max_size=300), st.booleans(),
))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(headers)
def test_any_idx_header_reads_correctly_or_fails_in_one_line_within_bounded_memory(case):
    (zero, type_code, ndim), dims, payload, gz = case
    data = zero + bytes([type_code, ndim]) + b"".join(d.to_bytes(4, "big") for d in dims) + payload
    if gz:
        data = gzip.compress(data)
    tracemalloc.start()
    try:
        try:
            array = read_idx_bytes(data, "fuzzed-file")
        except DataError as e:
            assert "\n" not in str(e) and "fuzzed-file" in str(e)
        else:
            assert array.shape == tuple(dims)
            assert array.nbytes == len(payload)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 10_000), st.integers(0, 255))
def test_a_corrupted_byte_in_a_gzip_idx_file_never_escapes_as_another_exception(position, value):
    data = bytearray(gzip.compress(idx_bytes(IMAGES)))
    data[position % len(data)] = value
    try:
        array = read_idx_bytes(bytes(data), "flipped.gz")
    except DataError as e:
        assert "\n" not in str(e) and "flipped.gz" in str(e)
    else:
        assert array.size <= IMAGES.size * 2
