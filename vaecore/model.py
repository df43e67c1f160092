"""The VAE: an MLP encoder and decoder with hand-written forward and backward passes.

Every weight and bias is a view into one flat buffer ``params`` (and every gradient a view into
``grads`` laid out the same way), so the optimizer updates the whole model in one kernel call and a
checkpoint is one array. Activations and deltas live in a :class:`Workspace` sized once per batch
size; after the first step of a given size, a training step allocates no arrays.

Shapes: B batch, D = C*H*W pixels, Z latent. The encoder maps (B, D) to ``stats`` (B, 2Z) = [mu |
logvar] with one matmul for both heads; the decoder maps z (B, Z) to (B, D) logits or means, or
(B, 2D) [mean | logvar] for a learned-variance Gaussian.
"""

import math
from dataclasses import dataclass

import numpy as np

from .config import ModelConfig


@dataclass
class Dense:
    """``y = act(x @ W + b)``; ``W`` is (n_in, n_out) so the batch stays row-major."""
    W: object
    b: object
    dW: object
    db: object
    activation: str


def layer_dims(config: ModelConfig):
    """(n_in, n_out, activation) of every layer, encoder first, then decoder."""
    widths = list(config.hidden)
    out_dim = 2 * config.input_dim if config.likelihood == "gaussian-learned" else config.input_dim
    enc = [config.input_dim, *widths, 2 * config.latent_dim]
    dec = [config.latent_dim, *reversed(widths), out_dim]
    act = config.activation
    layers = []
    for dims in (enc, dec):
        for i in range(len(dims) - 1):
            last = i == len(dims) - 2
            layers.append((dims[i], dims[i + 1], "identity" if last else act))
    return layers, len(enc) - 1


def forward_layers(backend, layers, h, outputs):
    """``h`` through ``layers``, each output into its preallocated buffer; returns the last."""
    linear_act = backend.kernels.linear_act
    for layer, out in zip(layers, outputs):
        linear_act(h, layer.W, layer.b, layer.activation, out)
        h = out
    return h


def backward_layers(backend, layers, x, outputs, deltas, dx_out, update=None, first=0):
    """Backward through a stack whose last delta is already filled: writes every layer's dW and db,
    and d(input) into ``dx_out`` unless it is None (the encoder needs no gradient for the images).

    With ``update`` (:class:`vaecore.optim.LayerUpdates`), each layer's weight and data gradients are
    left to ``update(first + i, input, delta, d_input)``, which also updates the layer."""
    for i in range(len(layers) - 1, -1, -1):
        layer, delta = layers[i], deltas[i]
        backend.kernels.bias_act_backward(delta, outputs[i], layer.activation, delta, layer.db)
        inputs = x if i == 0 else outputs[i - 1]
        below = dx_out if i == 0 else deltas[i - 1]
        if update is not None:
            update(first + i, inputs, delta, below)
            continue
        backend.matmul(inputs.T, delta, layer.dW)
        if below is not None:
            backend.matmul(delta, layer.W.T, below)


def parameter_count(config: ModelConfig):
    return sum(n_in * n_out + n_out for n_in, n_out, _ in layer_dims(config)[0])


class Workspace:
    """Every buffer one forward/backward pass of batch size ``B`` needs, allocated once."""

    def __init__(self, backend, config: ModelConfig, layers, n_encoder, batch_size):
        B, Z = batch_size, config.latent_dim
        self.batch_size = B
        self.x = backend.empty((B, config.input_dim))
        self.eps = backend.empty((B, Z))
        self.eps_host = np.empty((B, Z), dtype=np.float32)   # host side of the noise; unused on NumPy
        self.z = backend.empty((B, Z))
        self.dz = backend.empty((B, Z))
        # outputs of every layer; the encoder's last is ``stats``, the decoder's last the image head
        self.acts = [backend.empty((B, n_out)) for _, n_out, _ in layers]
        self.deltas = [backend.empty((B, n_out)) for _, n_out, _ in layers]
        self.stats = self.acts[n_encoder - 1]
        self.dstats = self.deltas[n_encoder - 1]
        self.out = self.acts[-1]
        self.dout = self.deltas[-1]


class VAE:
    def __init__(self, config: ModelConfig, backend, init_seed=0):
        self.config = config.validate()
        self.backend = backend
        specs, self.n_encoder = layer_dims(config)
        self.n_params = parameter_count(config)
        self.params = backend.zeros((self.n_params,))
        self.grads = backend.zeros((self.n_params,))
        self._layer_specs = specs
        # (offset, n_in, n_out) of every layer's [W; b] block in the flat buffers (also Adam's layout
        # hint, kernels/adam.py)
        blocks, offset = [], 0
        for n_in, n_out, _ in specs:
            blocks.append((offset, n_in, n_out))
            offset += (n_in + 1) * n_out
        self.param_blocks = np.array(blocks, np.int64)
        self.layers = [Dense(w, b, dw, db, act) for (w, b), (dw, db), (_, _, act)
                       in zip(self.layer_views(self.params), self.layer_views(self.grads), specs)]
        self._workspaces = {}
        self.initialize(init_seed)

    def layer_views(self, flat):
        """(W, b) views of every layer into ``flat``, a buffer laid out like ``params``."""
        views = []
        for offset, n_in, n_out in self.param_blocks.tolist():
            bias_at = offset + n_in * n_out
            views.append((self.backend.xp.reshape(flat[offset:bias_at], (n_in, n_out)),
                          flat[bias_at:bias_at + n_out]))
        return views

    def initialize(self, seed):
        """PyTorch's ``nn.Linear`` default, U(-1/sqrt(n_in), 1/sqrt(n_in)), drawn on the host.

        Drawing on the host makes the initial weights identical on every backend.
        """
        rng = np.random.default_rng(seed)
        host = np.empty(self.n_params, dtype=np.float32)
        for offset, n_in, n_out in self.param_blocks.tolist():
            size = (n_in + 1) * n_out
            bound = 1.0 / math.sqrt(n_in)
            host[offset:offset + size] = rng.uniform(-bound, bound, size)
        self.backend.copy_from_host(self.params, host)

    @property
    def encoder(self):
        return self.layers[:self.n_encoder]

    @property
    def decoder(self):
        return self.layers[self.n_encoder:]

    def workspace(self, batch_size):
        ws = self._workspaces.get(batch_size)
        if ws is None:
            ws = Workspace(self.backend, self.config, self._layer_specs, self.n_encoder, batch_size)
            self._workspaces[batch_size] = ws
        return ws

    # -- forward ------------------------------------------------------------------------------
    def encode(self, ws):
        """ws.x (B, D) -> ws.stats (B, 2Z) = [mu | logvar]."""
        return forward_layers(self.backend, self.encoder, ws.x, ws.acts[:self.n_encoder])

    def decode(self, ws):
        """ws.z (B, Z) -> ws.out, the likelihood's parameters."""
        return forward_layers(self.backend, self.decoder, ws.z, ws.acts[self.n_encoder:])

    def reconstruction_nll(self, ws, grad_scale):
        """Summed -log p(x | z) of the batch; writes ``grad_scale * d/d(out)`` into ws.dout."""
        k, cfg = self.backend.kernels, self.config
        if cfg.likelihood == "bernoulli":
            return k.bernoulli_nll_grad(ws.out, ws.x, grad_scale, ws.dout)
        if cfg.likelihood == "gaussian":
            return k.gaussian_nll_grad(ws.out, ws.x, 2.0 * math.log(cfg.gaussian_std), grad_scale, ws.dout)
        return k.gaussian_learned_nll_grad(ws.out, ws.x, grad_scale, ws.dout)

    def loss(self, ws, grad_scale=0.0):
        """One-sample ELBO terms of the batch in ws.x with the noise in ws.eps: (rec_sum, kl_sum)."""
        self.encode(ws)
        kl = self.backend.kernels.reparameterize_kl(ws.stats, ws.eps, ws.z)
        self.decode(ws)
        return self.reconstruction_nll(ws, grad_scale), kl

    # -- backward -----------------------------------------------------------------------------
    def backward(self, ws, kl_weight, grad_scale, update=None):
        """Fills ``self.grads`` from ws.dout, which ``loss`` left already scaled by ``grad_scale``; with
        ``update``, also updates each layer as soon as its gradient is known (see ``backward_layers``)."""
        k = self.backend.kernels
        n_enc = self.n_encoder
        backward_layers(self.backend, self.decoder, ws.z, ws.acts[n_enc:], ws.deltas[n_enc:], ws.dz, update, n_enc)
        # a knob (a replayed step's array, already scaled) passes as itself, not as a new product
        weight = kl_weight if grad_scale == 1.0 else kl_weight * grad_scale
        k.reparameterize_kl_backward(ws.stats, ws.eps, ws.dz, weight, ws.dstats)
        backward_layers(self.backend, self.encoder, ws.x, ws.acts[:n_enc], ws.deltas[:n_enc], None, update)

    # -- what users call ------------------------------------------------------------------------
    def mean_image(self, out):
        """The decoder's expected image in [0, 1] from its raw output (allocates; not for the hot loop)."""
        xp, cfg = self.backend.xp, self.config
        d = cfg.input_dim
        if cfg.likelihood == "bernoulli":
            return 1.0 / (1.0 + xp.exp(-out))
        return xp.clip(out[:, :d], 0.0, 1.0)
