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
    flat = images.reshape(len(images), -1)
    out = np.empty_like(flat)
    rng = np.random.default_rng(seed)
    scratch = np.empty((min(_ROWS, len(flat)), flat.shape[1]), dtype=np.float32)
    for start in range(0, len(flat), _ROWS):
        stop = min(len(flat), start + _ROWS)
        out[start:stop] = flat[start:stop]
        binarize_into(out[start:stop], rng, scratch[:stop - start])
    return out.reshape(images.shape)


def binarize_into(batch, rng, scratch):
    """Binarizes the host uint8 batch in place, allocating nothing: ``scratch`` is a float32 array
    with as many elements as the batch, reused from step to step.

    Draws exactly ``batch.size`` float32 uniforms from ``rng``, in pixel order. Pass the *training*
    generator (``backend.rng``): its state is what the checkpoint saves, so a resumed run draws the
    same binarizations as a straight one, and no second, unsaved stream makes runs irreproducible.

    A pixel of value v is set when ``r < v`` with ``r = floor(255 u)``, u uniform in [0, 1): with
    probability v / 255 (0 stays 0, 255 stays 255; float32 rounding of ``255 u`` moves the others by
    at most 2**-24). The comparison is made between uint8 arrays because a mixed uint8 / float32
    ufunc allocates casting buffers: the first quarter of ``scratch``'s bytes holds ``r``, the rest
    takes the uniforms, in two blocks.
    """
    flat = batch.reshape(-1)
    n = flat.size
    if scratch.dtype != np.float32 or scratch.size < n or not scratch.flags.c_contiguous:
        raise ValueError(f"scratch must be a C-contiguous float32 array of at least {n} elements")
    if n < 2:                                          # no room to split; nothing to save either
        flat[...] = np.where(255.0 * rng.random(n, dtype=np.float32) < flat, 255, 0)
        return batch
    floats = scratch.reshape(-1)
    reserved = -(-n // 4)                              # floats whose bytes hold r
    r = floats.view(np.uint8)[:n]
    done = 0
    while done < n:
        m = min(n - done, n - reserved)
        uniforms = floats[reserved:reserved + m]
        rng.random(dtype=np.float32, out=uniforms)
        np.multiply(uniforms, np.float32(255.0), out=uniforms)
        np.copyto(r[done:done + m], uniforms, casting="unsafe")   # truncates: floor(255 u) in 0..254
        done += m
    np.less(r, flat, out=flat.view(np.bool_))          # 1 where set, 0 elsewhere
    np.multiply(flat, np.uint8(255), out=flat)
    return batch
