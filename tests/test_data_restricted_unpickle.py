"""The restricted unpickler admits NumPy arrays and refuses everything else before it can run."""

import io
import os
import pickle

import numpy as np
import pytest

from vaecore.data.restricted_unpickle import load_numpy_pickle


class RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_numpy_arrays_round_trip():
    data = ((np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2], dtype=np.int64)),)
    back = load_numpy_pickle(io.BytesIO(pickle.dumps(data, protocol=3)))
    np.testing.assert_array_equal(back[0][0], data[0][0])
    assert back[0][0].dtype == np.float32 and back[0][1].dtype == np.int64


def test_python2_style_global_name_of_numpy_1_is_admitted():
    payload = pickle.dumps(np.arange(3, dtype=np.int64), protocol=3)
    legacy = payload.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    np.testing.assert_array_equal(load_numpy_pickle(io.BytesIO(legacy)), np.arange(3))


def test_a_pickle_that_would_run_a_command_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(pickle.UnpicklingError, match="refused to load posix.system"):
        load_numpy_pickle(io.BytesIO(pickle.dumps(RunsACommand(marker))))
    assert not marker.exists()


def test_builtins_are_refused_too():
    with pytest.raises(pickle.UnpicklingError, match="refused to load __builtin__.set"):
        load_numpy_pickle(io.BytesIO(pickle.dumps(set([1]), protocol=2)))


def test_object_arrays_are_refused():
    with pytest.raises(pickle.UnpicklingError, match="object dtype"):
        load_numpy_pickle(io.BytesIO(pickle.dumps(np.array([1, "a"], dtype=object), protocol=3)))
