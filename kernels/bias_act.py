"""Bias add fused with an activation, forward (in place) and backward.

After ``h = a @ W`` lands in a preallocated buffer, ``bias_act`` turns it into ``act(h + b)`` in the
same memory. The backward pass needs only the layer's *output* ``y``, because every activation here
has a derivative expressible through it::

    relu:     y' = (y > 0)        tanh:     y' = 1 - y**2
    sigmoid:  y' = y (1 - y)      identity: y' = 1

``bias_act_backward`` writes ``dpre = dy * y'`` (``dpre_out`` may be ``dy`` itself) and the bias
gradient ``dbias = sum_rows(dpre)``.

``linear_act(x, W, bias, activation, out)`` is a dense layer's whole forward, ``out[...] = act(x @ W +
bias)``: a table's ``matmul`` then its ``bias_act`` (``linear_act_composed``), unless the table has a
better way (the CPU table's own, at a batch of 9 to 128 rows: kernels/cpu.py).
"""

from .matmul import matmul_reference
from .namespace import array_namespace

ACTIVATIONS = ("identity", "relu", "tanh", "sigmoid")


def activation_code(activation):
    """The position of ``activation`` in ``ACTIVATIONS``: the compiled kernels branch on this number."""
    try:
        return ACTIVATIONS.index(activation)
    except ValueError:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}") from None


def bias_act_reference(h, bias, activation):
    """In place: ``h[...] = act(h + bias)``; ``h`` is (B, N), ``bias`` is (N,)."""
    xp = array_namespace(h)
    pre = h + bias
    if activation == "identity":
        h[...] = pre
    elif activation == "relu":
        h[...] = xp.maximum(pre, 0.0)
    elif activation == "tanh":
        h[...] = xp.tanh(pre)
    elif activation == "sigmoid":
        h[...] = 1.0 / (1.0 + xp.exp(-pre))
    else:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")


def bias_act_backward_reference(dy, y, activation, dpre_out, dbias_out):
    xp = array_namespace(dy)
    if activation == "identity":
        dpre = dy
    elif activation == "relu":
        dpre = xp.where(y > 0, dy, 0.0)
    elif activation == "tanh":
        dpre = dy * (1.0 - y * y)
    elif activation == "sigmoid":
        dpre = dy * y * (1.0 - y)
    else:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    if dpre is not dpre_out:
        dpre_out[...] = dpre
    dbias_out[...] = xp.sum(dpre_out, axis=0)


def linear_act_composed(matmul, bias_act, x, W, bias, activation, out):
    """The contract spelled with a table's ``matmul`` and ``bias_act``."""
    matmul(x, W, out)
    bias_act(out, bias, activation)


def linear_act_reference(x, W, bias, activation, out):
    linear_act_composed(matmul_reference, bias_act_reference, x, W, bias, activation, out)
