"""User pictures become training-like images; bad files are one-line errors; grids have the right size."""

import numpy as np
import pytest
from PIL import Image

from vaecore import images
from vaecore.errors import VaecoreError


def drawing(path, size=(120, 90), mode="RGB", ink=(0, 0, 0), paper=(255, 255, 255)):
    """A dark cross on light paper, the way people draw digits."""
    picture = Image.new("RGB", size, paper)
    pixels = np.array(picture)
    pixels[30:60, 55:65] = ink
    pixels[40:50, 40:80] = ink
    Image.fromarray(pixels).convert(mode).save(path)
    return path


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "RGBA", "1"])
def test_dark_on_light_drawing_is_inverted_and_centred(tmp_path, mode):
    image = images.read_image(drawing(tmp_path / "d.png", mode=mode), (1, 28, 28))
    assert image.shape == (1, 28, 28) and image.dtype == np.uint8
    assert image[0, :3].max() == 0 and image[0, -3:].max() == 0    # dark margin, as in MNIST
    assert image[0, 14, 14] > 200                                    # bright ink in the middle


def test_invert_flag_forces_either_way(tmp_path):
    path = drawing(tmp_path / "d.png")
    assert images.read_image(path, (1, 28, 28), invert="no", fit="stretch")[0, 0, 0] == 255
    assert images.read_image(path, (1, 28, 28), invert="yes", fit="stretch")[0, 0, 0] == 0


def test_light_on_dark_is_left_alone(tmp_path):
    path = drawing(tmp_path / "d.png", ink=(255, 255, 255), paper=(0, 0, 0))
    image = images.read_image(path, (1, 28, 28))
    assert image[0, 0, 0] == 0 and image.max() > 200


@pytest.mark.parametrize("ink", [0, 255])          # black or white strokes on a clear background
def test_strokes_on_transparency_stay_visible(tmp_path, ink):
    rgba = np.zeros((40, 40, 4), dtype=np.uint8)
    rgba[10:30, 18:22] = (ink, ink, ink, 255)                         # opaque stroke, clear elsewhere
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    image = images.read_image(tmp_path / "t.png", (1, 28, 28))
    assert image[0, 0, 0] == 0 and image.max() > 200


def test_three_channel_models_get_rgb(tmp_path):
    image = images.read_image(drawing(tmp_path / "d.png", mode="L"), (3, 16, 16))
    assert image.shape == (3, 16, 16)


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    (b"", "not an image"),
    (b"hello, this is text", "not an image"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "image"),
])
def test_bad_files_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "bad.png"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(VaecoreError, match=message) as info:
        images.read_image(path, (1, 28, 28))
    assert str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("side", [40, 300])      # in Pillow's warning band, and past its error limit
def test_decompression_bomb_guard_stays_on(tmp_path, monkeypatch, side):
    Image.new("L", (side, side)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(VaecoreError, match="too many pixels"):
        images.read_image(tmp_path / "big.png", (1, 28, 28))


def test_grid_and_comparison_sizes():
    batch = np.full((5, 1, 4, 4), 200, dtype=np.uint8)
    picture = images.grid(batch, ncols=3, scale=2, pad=1)
    assert picture.size == ((1 + 3 * 5) * 2, (1 + 2 * 5) * 2)
    panel = images.comparison(batch, batch, scale=1)
    assert panel.size == (2 + 5 * 6, 2 + 2 * 6)


def test_save_png_replaces_atomically(tmp_path):
    target = tmp_path / "out.png"
    target.write_bytes(b"old")
    images.save_png(Image.new("L", (4, 4)), target)
    assert Image.open(target).size == (4, 4)
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]
