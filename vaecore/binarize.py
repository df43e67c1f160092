"""Binarized images, the density-estimation setting of the VAE literature.

Grey levels are read as probabilities: a pixel of value v becomes 255 with probability v / 255 and
0 otherwise. Training batches are binarized afresh every time they are drawn ("dynamic"
binarization, a cheap regularizer); the test set is binarized once, with a fixed seed, so every
evaluation of every model scores the same binary images and log-likelihoods are comparable.

Both work on the host, on uint8 images, before anything crosses to the device.
"""

import numpy as np

TEST_SEED = 0          # the one binarization of a test set that every evaluation uses
_ROWS = 4096           # images per slice in binarize_fixed, to bound its temporary memory


def binarize_fixed(images, seed=TEST_SEED):
    """A new uint8 array like ``images`` with every pixel 0 or 255, 255 with probability pixel / 255.

    The same ``images`` and ``seed`` always give the same result, on any machine, whatever the
    number of images (the draws are one sequential stream, consumed in slices).
    """
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(f"binarize_fixed takes uint8 images, got {images.dtype}")
    out = images.reshape(len(images), -1).copy()
    rng, binarize = np.random.default_rng(seed), DynamicBinarizer()
    for start in range(0, len(out), _ROWS):
        binarize(out[start:start + _ROWS], rng)
    return out.reshape(images.shape)


class DynamicBinarizer:
    """Binarizes host uint8 batches in place; after the first batch of a shape, allocates nothing.

    Call it with the *training* generator (``backend.rng``): its state is what the checkpoint saves,
    so a resumed run draws the same binarizations as a straight one.

    A pixel of value v is set when ``floor(255 u) < v`` for u uniform in [0, 1), which happens with
    probability v / 255 (0 stays 0, 255 stays 255). Exactly one float32 uniform is drawn per pixel,
    in pixel order. The comparison is made between uint8 arrays, because a mixed uint8 / float32
    ufunc would allocate casting buffers.
    """

    def __init__(self):
        self._scratch = {}       # batch shape -> (float32 uniforms, uint8 levels)

    def __call__(self, batch, rng):
        scratch = self._scratch.get(batch.shape)
        if scratch is None:
            scratch = self._scratch[batch.shape] = (np.empty(batch.shape, np.float32), np.empty(batch.shape, np.uint8))
        uniforms, levels = scratch
        rng.random(dtype=np.float32, out=uniforms)
        np.multiply(uniforms, np.float32(255.0), out=uniforms)
        np.copyto(levels, uniforms, casting="unsafe")      # truncates: floor(255 u), 0..254
        np.less(levels, batch, out=batch.view(np.bool_))   # 1 where set, 0 elsewhere
        np.multiply(batch, np.uint8(255), out=batch)
        return batch
