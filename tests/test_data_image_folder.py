"""Folders of a user's images: any mode and size in, uint8 N x C x S x S out, bad files named."""

import numpy as np
import pytest
from PIL import Image

from vaecore.data import load_dataset
from vaecore.errors import DataError


class Recorder(list):
    def __call__(self, message):
        assert "\n" not in message
        self.append(message)


def gray(w, h, value=128):
    return Image.new("L", (w, h), value)


def mixed_folder(root):
    """Two classes, images in many modes and sizes, and a few files that are not images."""
    (root / "cat").mkdir(parents=True)
    (root / "dog" / "nested").mkdir(parents=True)
    gray(10, 12).save(root / "cat" / "l.png")
    Image.new("RGB", (40, 30), (200, 10, 10)).save(root / "cat" / "rgb.jpg", quality=95)
    Image.new("RGBA", (28, 28), (255, 0, 0, 0)).save(root / "cat" / "transparent.png")
    Image.new("1", (17, 9), 1).save(root / "cat" / "bits.bmp")
    Image.new("CMYK", (20, 20), (0, 0, 0, 0)).save(root / "cat" / "cmyk.jpg")
    gray(64, 64, 30).convert("P").save(root / "dog" / "palette.gif")
    Image.new("LA", (5, 50), (255, 128)).save(root / "dog" / "la.png")
    Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(root / "dog" / "nested" / "sixteen.png")
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / "README.md").write_text("beside the class folders")
    (root / "cat" / ".DS_Store").write_bytes(b"\0\1")
    (root / ".hidden").mkdir()
    gray(4, 4).save(root / ".hidden" / "ignored.png")
    return root


def test_mixed_modes_and_sizes_become_uint8_gray_squares_with_class_labels(tmp_path):
    log = Recorder()
    ds = load_dataset(str(mixed_folder(tmp_path / "pets")), log=log)
    assert ds.name == "pets" and ds.classes == ("cat", "dog")
    assert ds.x_train.dtype == np.uint8 and ds.image_shape == (1, 28, 28)
    assert len(ds.x_train) + len(ds.x_test) == 8 and len(ds.x_test) == 2
    assert sorted(np.concatenate([ds.y_train, ds.y_test])) == [0] * 5 + [1] * 3
    assert any("skipped 2 non-image files" in m for m in log)  # notes.txt, README.md; hidden ones are ignored
    assert "image folder" in ds.origin and "seed 0" in ds.origin


def test_image_size_and_three_channels(tmp_path):
    ds = load_dataset(str(mixed_folder(tmp_path / "pets")), image_size=16, channels=3, log=Recorder())
    assert ds.image_shape == (3, 16, 16)


def pixels_of(tmp_path, image, name="one.png", **kwargs):
    folder = tmp_path / name.split(".")[0]
    folder.mkdir()
    image.save(folder / name)
    gray(3, 3, 0).save(folder / "zero.png")
    ds = load_dataset(str(folder), log=Recorder(), **kwargs)
    both = np.concatenate([ds.x_train, ds.x_test])
    return both[both.reshape(len(both), -1).max(axis=1).argmax()] if both.max() else both[0]


def test_transparent_pixels_become_black_not_their_hidden_colour(tmp_path):
    img = Image.new("RGBA", (6, 6), (255, 255, 255, 0))
    img.putpixel((0, 0), (255, 255, 255, 255))
    x = pixels_of(tmp_path, img, image_size=6, channels=3)
    assert x[:, 0, 0].tolist() == [255, 255, 255]
    assert x[:, 3, 3].tolist() == [0, 0, 0]


def test_sixteen_bit_gray_is_scaled_not_clipped(tmp_path):
    x = pixels_of(tmp_path, Image.fromarray(np.full((4, 4), 257 * 100, dtype=np.uint16)), image_size=4)
    assert (x == 100).all()


def test_flat_folder_has_no_labels(tmp_path):
    folder = tmp_path / "flat"
    folder.mkdir()
    for i in range(5):
        gray(8, 8, i * 40).save(folder / f"{i}.png")
    ds = load_dataset(str(folder), log=Recorder())
    assert ds.y_train is None and ds.y_test is None and ds.classes is None
    assert len(ds.x_train) == 4 and len(ds.x_test) == 1


def test_the_split_follows_the_seed(tmp_path):
    folder = tmp_path / "flat"
    folder.mkdir()
    for i in range(20):
        gray(4, 4, i * 10).save(folder / f"{i:02}.png")
    a, b, c = (load_dataset(str(folder), seed=s, log=Recorder()) for s in (5, 5, 6))
    np.testing.assert_array_equal(a.x_test, b.x_test)
    assert not np.array_equal(a.x_test, c.x_test)


def test_an_unreadable_image_names_the_file(tmp_path):
    folder = mixed_folder(tmp_path / "pets")
    (folder / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(DataError) as e:
        load_dataset(str(folder), log=Recorder())
    assert "\n" not in str(e.value) and "broken.png" in str(e.value)


def test_a_truncated_image_names_the_file(tmp_path):
    folder = mixed_folder(tmp_path / "pets")
    good = folder / "cat" / "rgb.jpg"
    good.write_bytes(good.read_bytes()[:300])
    with pytest.raises(DataError) as e:
        load_dataset(str(folder), log=Recorder())
    assert "rgb.jpg" in str(e.value)


def test_skip_bad_skips_and_counts_unreadable_images(tmp_path):
    folder = mixed_folder(tmp_path / "pets")
    (folder / "dog" / "broken.png").write_bytes(b"not a png at all")
    log = Recorder()
    ds = load_dataset(str(folder), skip_bad=True, log=log)
    assert len(ds.x_train) + len(ds.x_test) == 8
    assert any("1 unreadable images" in m for m in log)


def test_the_decompression_bomb_guard_stays_on(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    folder = tmp_path / "bomb"
    folder.mkdir()
    gray(30, 30).save(folder / "big.png")
    gray(5, 5).save(folder / "small.png")
    with pytest.raises(DataError) as e:
        load_dataset(str(folder), log=Recorder())
    assert "big.png" in str(e.value) and "DecompressionBomb" in str(e.value)


def test_a_folder_without_images_says_so(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "a.txt").write_text("x")
    with pytest.raises(DataError) as e:
        load_dataset(str(folder), log=Recorder())
    assert "no images found" in str(e.value) and "1 other files" in str(e.value)


@pytest.mark.parametrize("kwargs", [{"channels": 2}, {"image_size": 0}])
def test_bad_shape_options_are_refused(tmp_path, kwargs):
    folder = mixed_folder(tmp_path / "pets")
    with pytest.raises(DataError):
        load_dataset(str(folder), log=Recorder(), **kwargs)
