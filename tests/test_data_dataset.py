"""The Dataset contract the engine relies on, and how a source string picks its loader."""

import numpy as np
import pytest

from vaecore.data import Dataset, describe, load_dataset
from vaecore.errors import DataError

rng = np.random.default_rng(1)


def small(n=10, m=4, labels=True, classes=None):
    x = rng.integers(0, 256, size=(n, 1, 3, 3), dtype=np.uint8)
    xt = rng.integers(0, 256, size=(m, 1, 3, 3), dtype=np.uint8)
    y = np.arange(n, dtype=np.int64) % 3 if labels else None
    yt = np.arange(m, dtype=np.int64) % 3 if labels else None
    return Dataset("small", "made in a test", x, xt, y, yt, classes=classes)


def test_take_keeps_the_first_training_images_and_the_whole_test_split():
    ds = small()
    part = ds.take(3)
    np.testing.assert_array_equal(part.x_train, ds.x_train[:3])
    np.testing.assert_array_equal(part.y_train, ds.y_train[:3])
    assert part.x_test is ds.x_test and part.y_test is ds.y_test
    assert part.x_train.flags["C_CONTIGUOUS"]


def test_take_more_than_there_is_gives_everything():
    assert len(small().take(1000).x_train) == 10


def test_take_without_labels():
    assert small(labels=False).take(2).y_train is None


@pytest.mark.parametrize("n", [0, -5])
def test_take_less_than_one_is_an_error(n):
    with pytest.raises(DataError):
        small().take(n)


def test_image_shape_is_channels_height_width():
    assert small().image_shape == (1, 3, 3)


def test_a_dataset_refuses_arrays_the_engine_would_misread():
    x = np.zeros((2, 1, 3, 3), dtype=np.uint8)
    with pytest.raises(DataError):
        Dataset("bad", "test", x.astype(np.float32), x)
    with pytest.raises(DataError):
        Dataset("bad", "test", x, x, np.zeros(2, dtype=np.int32), None)
    with pytest.raises(DataError):
        Dataset("bad", "test", x, np.zeros((2, 3, 3, 3), dtype=np.uint8))


def test_describe_shows_name_origin_shapes_labels_and_mean():
    ds = small(classes=("a", "b", "c"))
    ds.x_train[:] = 51  # mean 51 / 255 = 0.2
    text = describe(ds)
    assert "small" in text and "made in a test" in text
    assert "10 images of 1 x 3 x 3" in text and "uint8" in text
    assert "pixel mean 0.2000" in text
    assert "0 a: 4, 1 b: 3, 2 c: 3" in text


def test_describe_without_labels():
    assert "labels: none" in describe(small(labels=False))


def test_an_unknown_source_is_a_one_line_error_listing_the_names(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset(str(tmp_path / "nowhere"), log=print)
    assert "\n" not in str(e.value) and "mnist, fashion-mnist" in str(e.value)


def test_a_file_that_is_not_npz_is_refused(tmp_path):
    path = tmp_path / "images.csv"
    path.write_text("1,2,3")
    with pytest.raises(DataError) as e:
        load_dataset(str(path), log=print)
    assert "images.csv" in str(e.value)
