"""Unpickling NumPy arrays and nothing else.

A pickle is a program: every class or function it names is looked up and called while loading, so
loading one from the internet can run anything. The classic ``mnist.pkl.gz`` is only reachable as a
pickle, so it is read with an unpickler whose ``find_class`` admits exactly the three names NumPy's
array reconstruction needs and refuses every other one before it is looked up.
"""

from __future__ import annotations

import pickle

import numpy as np

# ndarray.__reduce__ hands back the reconstruction function itself, wherever this NumPy keeps it
# (numpy.core.multiarray in NumPy 1, numpy._core.multiarray in NumPy 2).
_reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]


def _plain_dtype(*args):
    """np.dtype, minus object dtypes: an object array would be filled from further pickle opcodes."""
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise pickle.UnpicklingError("refused an object dtype: only plain numeric arrays are admitted")
    return dtype


ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _plain_dtype,
}


class NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: only NumPy arrays are admitted") from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refused a persistent reference: only NumPy arrays are admitted")


def load_numpy_pickle(fileobj):
    """Loads a pickle of (tuples of) NumPy arrays, including Python 2 pickles such as
    ``mnist.pkl.gz`` (their byte strings are decoded as latin-1, which NumPy expects)."""
    return NumpyOnlyUnpickler(fileobj, encoding="latin1").load()
