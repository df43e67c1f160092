"""uint8 pixels to floats in [0, 1] on the device: ``out[...] = src / 255``.

Only uint8 crosses from the host (a quarter of the bytes of float32); the division happens where the
batch is used. ``src`` is (B, D) uint8 and ``out`` (B, D) in the backend's float dtype; the product is
the float cast of ``src`` times ``1/255`` rounded to that dtype, so every table gives the same bits.
"""

from .namespace import array_namespace


def pixels_reference(src, out):
    xp = array_namespace(out)
    out[...] = xp.astype(src, out.dtype) * (1.0 / 255.0)
