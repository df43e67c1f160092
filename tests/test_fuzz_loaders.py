"""Property-based fuzzing of the checkpoint and image loaders: whatever the bytes, the only
failure is the project's own one-line error, and no file makes them allocate what it cannot hold."""

import io
import tracemalloc
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from test_training import make_trainer
from vaecore import checkpoint, images
from vaecore.errors import CheckpointError, VaecoreError

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory):
    trainer = make_trainer("numpy")
    path = tmp_path_factory.mktemp("ckpt") / "model.npz"
    checkpoint.save(path, trainer.model, trainer.optimizer, trainer.config, epoch=1)
    return path.read_bytes()


def mutate(data, edits, cut):
    data = bytearray(data)
    for position, value in edits:
        data[position % len(data)] = value
    return bytes(data[:cut % (len(data) + 1)] if cut is not None else data)


edits = st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), max_size=8)
cuts = st.one_of(st.none(), st.integers(min_value=0))


@FUZZ
@given(edits=edits, cut=cuts)
def test_mutated_checkpoints_fail_only_with_checkpoint_error(checkpoint_bytes, tmp_path, edits, cut):
    path = tmp_path / "model.npz"
    path.write_bytes(mutate(checkpoint_bytes, edits, cut))
    tracemalloc.start()
    try:
        checkpoint.load(path)
    except CheckpointError as e:
        assert "\n" not in str(e)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < 4 * len(checkpoint_bytes) + 2**20


def test_header_claiming_a_huge_array_is_refused_before_allocating(tmp_path):
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (2**40,)})
    path = tmp_path / "model.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("params.npy", header.getvalue() + b"\0" * 64)
    with pytest.raises(CheckpointError, match="claims more data than the file holds"):
        checkpoint.load(path)


def test_object_arrays_are_refused(tmp_path):
    path = tmp_path / "model.npz"
    np.savez(path, meta=np.array([{"a": 1}], dtype=object))
    with pytest.raises(CheckpointError, match="Python objects"):
        checkpoint.load(path)


def picture_bytes(fmt):
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (20, 24), dtype=np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


@FUZZ
@given(fmt=st.sampled_from(["PNG", "JPEG", "BMP", "GIF"]), edits=edits, cut=cuts)
def test_mutated_images_fail_only_with_vaecore_error(tmp_path, fmt, edits, cut):
    path = tmp_path / "picture"
    path.write_bytes(mutate(picture_bytes(fmt), edits, cut))
    try:
        image = images.read_image(path, (1, 28, 28))
    except VaecoreError as e:
        assert "\n" not in str(e)
    else:
        assert image.shape == (1, 28, 28) and image.dtype == np.uint8


@FUZZ
@given(data=st.binary(max_size=512))
def test_random_bytes_are_neither_checkpoints_nor_images(tmp_path, data):
    path = tmp_path / "blob"
    path.write_bytes(data)
    with pytest.raises(CheckpointError):
        checkpoint.load(path)
    try:
        images.read_image(path, (1, 28, 28))
    except VaecoreError:
        pass
