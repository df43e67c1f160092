"""A user's own .npz: accepted dtypes and layouts become uint8 NCHW; everything else is one line."""

import io
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vaecore.data import load_dataset
from vaecore.errors import DataError

rng = np.random.default_rng(7)
U8 = rng.integers(0, 256, size=(10, 6, 5), dtype=np.uint8)


def quiet(message):
    pass


def save(tmp_path, name="arrays.npz", compressed=False, **arrays):
    path = tmp_path / name
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path


def load(path, **kwargs):
    return load_dataset(str(path), log=quiet, **kwargs)


def error_for(path) -> str:
    with pytest.raises(DataError) as e:
        load(path)
    message = str(e.value)
    assert "\n" not in message and str(path) in message
    return message


@pytest.mark.parametrize("compressed", [False, True])
def test_uint8_n_h_w_gets_one_channel_and_keeps_its_test_split(tmp_path, compressed):
    labels = np.arange(10) % 3
    path = save(tmp_path, compressed=compressed, x_train=U8, y_train=labels, x_test=U8[:4], y_test=labels[:4])
    ds = load(path)
    assert ds.name == "arrays" and ds.image_shape == (1, 6, 5)
    np.testing.assert_array_equal(ds.x_train[:, 0], U8)
    assert ds.y_train.dtype == np.int64 and ds.x_test.shape == (4, 1, 6, 5)
    assert ds.x_train.flags["C_CONTIGUOUS"]


def test_channels_last_is_moved_to_channels_first(tmp_path):
    nhwc = rng.integers(0, 256, size=(4, 6, 5, 3), dtype=np.uint8)
    ds = load(save(tmp_path, x_train=nhwc, x_test=nhwc))
    assert ds.image_shape == (3, 6, 5)
    np.testing.assert_array_equal(ds.x_train[2, 1], nhwc[2, :, :, 1])


def test_channels_first_is_kept(tmp_path):
    nchw = rng.integers(0, 256, size=(4, 3, 6, 5), dtype=np.uint8)
    ds = load(save(tmp_path, x_train=nchw, x_test=nchw))
    np.testing.assert_array_equal(ds.x_train, nchw)


def test_flat_square_images_become_one_channel_squares(tmp_path):
    flat = rng.integers(0, 256, size=(4, 784), dtype=np.uint8)
    ds = load(save(tmp_path, x_train=flat, x_test=flat))
    assert ds.image_shape == (1, 28, 28)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_float_images_in_0_1_become_exact_uint8(tmp_path, dtype):
    x = (U8 / 255).astype(dtype)
    ds = load(save(tmp_path, x_train=x, x_test=x))
    np.testing.assert_array_equal(ds.x_train[:, 0], U8)


@pytest.mark.parametrize("bad", [np.float32(1.5), np.float32(-0.1), np.float32(np.nan)])
def test_float_images_outside_0_1_are_refused(tmp_path, bad):
    x = (U8 / 255).astype(np.float32)
    x[3, 2, 1] = bad
    assert "[0, 1]" in error_for(save(tmp_path, x_train=x))


@pytest.mark.parametrize("dtype", [np.int64, np.uint16, np.bool_, np.complex64])
def test_other_image_dtypes_are_refused(tmp_path, dtype):
    assert "uint8" in error_for(save(tmp_path, x_train=U8.astype(dtype)))


@pytest.mark.parametrize("shape", [(10, 30), (10, 6, 5, 4), (10,), (2, 2, 2, 2, 2)])
def test_unclear_shapes_are_refused(tmp_path, shape):
    error_for(save(tmp_path, x_train=np.zeros(shape, dtype=np.uint8)))


def test_float_labels_are_refused(tmp_path):
    assert "integers" in error_for(save(tmp_path, x_train=U8, y_train=np.zeros(10)))


def test_label_count_must_match(tmp_path):
    error_for(save(tmp_path, x_train=U8, y_train=np.zeros(9, dtype=np.int64)))


def test_x_test_must_have_the_training_image_shape(tmp_path):
    assert "x_test" in error_for(save(tmp_path, x_train=U8, x_test=U8[:, :5]))


def test_missing_x_train_is_named(tmp_path):
    assert "no x_train" in error_for(save(tmp_path, images=U8))


def test_object_arrays_are_never_unpickled(tmp_path):
    path = save(tmp_path, x_train=np.array([U8, None], dtype=object))
    assert "Python objects" in error_for(path)


def test_without_x_test_a_seeded_80_20_split_is_made(tmp_path):
    path = save(tmp_path, x_train=U8, y_train=np.arange(10))
    a, b, c = load(path, seed=3), load(path, seed=3), load(path, seed=4)
    assert len(a.x_train) == 8 and len(a.x_test) == 2
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert sorted(np.concatenate([a.y_train, a.y_test])) == list(range(10))
    assert not np.array_equal(np.concatenate([a.y_train, a.y_test]), np.concatenate([c.y_train, c.y_test]))
    assert "validation split, seed 3" in a.origin


def test_a_file_that_is_not_a_zip_is_refused(tmp_path):
    path = tmp_path / "fake.npz"
    path.write_bytes(b"hello, not an archive")
    assert "not a readable .npz" in error_for(path)


def test_a_truncated_npz_is_refused(tmp_path):
    path = save(tmp_path, x_train=U8)
    path.write_bytes(path.read_bytes()[:-200])
    error_for(path)


def test_a_flipped_data_byte_is_caught_by_the_zip_checksum(tmp_path):
    path = save(tmp_path, x_train=U8)
    data = bytearray(path.read_bytes())
    data[data.index(U8.tobytes()[:32]) + 100] ^= 0xFF
    path.write_bytes(bytes(data))
    assert "CRC" in error_for(path)


def test_a_header_promising_more_data_than_the_entry_holds_is_refused_before_allocating(tmp_path):
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.zeros((2, 3, 3), dtype=np.uint8))
    member = buf.getvalue().replace(b"(2, 3, 3)", b"(2000000000, 300, 3)", 1)
    path = tmp_path / "liar.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("x_train.npy", member)
    assert "different amount of data" in error_for(path)


def _small_npz(compressed):
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, x_train=U8[:4], y_train=np.arange(4))
    return buf.getvalue()


NPZ_FILES = {False: _small_npz(False), True: _small_npz(True)}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.booleans(), st.integers(0, 10_000), st.integers(0, 255), st.booleans())
def test_a_corrupted_npz_is_read_or_refused_in_one_line(tmp_path, compressed, position, value, truncate):
    data = bytearray(NPZ_FILES[compressed])
    position %= len(data)
    if truncate:
        del data[position:]
    else:
        data[position] = value
    path = tmp_path / "fuzzed.npz"
    path.write_bytes(bytes(data))
    try:
        ds = load(path)
    except DataError as e:
        assert "\n" not in str(e) and str(path) in str(e)
    else:
        assert ds.x_train.dtype == np.uint8
