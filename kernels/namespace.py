"""The array namespace of a reference kernel's argument: the kernels are written once, against the array
API, and run on whatever library the backend's arrays come from.

Arrays that follow the standard name their namespace (``x.__array_namespace__()``: NumPy 2,
array_api_strict). CuPy's ndarray does not (seen with CuPy 14.2 on an H200), although the ``cupy`` module
itself mirrors NumPy 2's array-API functions; so a CuPy array gets ``cupy``.
"""

import sys


def array_namespace(a):
    get = getattr(a, "__array_namespace__", None)
    if get is not None:
        return get()
    if type(a).__module__.partition(".")[0] == "cupy":
        return sys.modules["cupy"]          # a CuPy array exists only once cupy is imported
    raise TypeError(f"{type(a).__module__}.{type(a).__name__} is not an array-API array")
