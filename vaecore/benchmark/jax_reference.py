"""The same network and training step in JAX: one ``jax.jit``-compiled function doing the forward
pass, the gradient (``jax.value_and_grad``) and the Adam update, with the noise drawn inside it from a
``jax.random`` key carried in the state. The state's buffers are donated to each call so XLA may
update them in place. Float32 throughout (JAX's default). ``jax`` runs on XLA's CPU client whatever
else is installed; ``jax-gpu`` on the first GPU (compared with ``ours-cupy``).

JAX is never a dependency of vaecore: everything here imports it lazily, and :func:`status` says why
it cannot run.
"""

import os

import numpy as np

from ..errors import reason
from .configs import BETA1, BETA2, EPS, LR, BenchConfig, fixed_images

INSTALL = "pip install jax"


def status():
    """(usable, detail): JAX's version, or why it cannot be used."""
    try:
        import jax
    except ImportError:
        return False, f"JAX is not installed ({INSTALL})"
    except Exception as e:
        return False, f"JAX failed to import: {reason(e)}"
    return True, f"jax {jax.__version__}"


def gpu_status():
    """(usable, detail): like :func:`status`, and whether this JAX install reaches a GPU."""
    usable, detail = status()
    if not usable:
        return usable, detail
    import jax

    try:
        device = jax.devices("gpu")[0]
    except RuntimeError as e:
        return False, f"JAX {jax.__version__} finds no GPU ({reason(e)}); for CUDA: pip install 'jax[cuda13]'"
    return True, f"{detail}, {device.device_kind}"


def threads_note():
    """What XLA's CPU client does with threads: it sizes its own intra-op pool, one thread per core."""
    flags = os.environ.get("XLA_FLAGS", "")
    return (f"XLA CPU, its own thread pool ({os.cpu_count()} cores"
            + (f"; XLA_FLAGS={flags}" if flags else "; XLA_FLAGS unset") + ")")


def params_from_flat(config: BenchConfig, flat):
    """[(W (n_in, n_out), b), ...] as jax arrays from the engine's flat parameter layout."""
    import jax.numpy as jnp

    params, offset = [], 0
    for n_in, n_out in config.layer_dims():
        w = flat[offset:offset + n_in * n_out].reshape(n_in, n_out)
        offset += n_in * n_out
        params.append((jnp.asarray(w), jnp.asarray(flat[offset:offset + n_out])))
        offset += n_out
    return params


def to_flat(params):
    return np.concatenate([np.asarray(a).ravel() for layer in params for a in layer]).astype(np.float32)


def init_flat(config: BenchConfig, seed=0):
    """PyTorch's ``nn.Linear`` initialization, U(-1/sqrt(n_in), 1/sqrt(n_in)), drawn with NumPy."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.uniform(-bound, bound, n_in * n_out + n_out).astype(np.float32)
                           for n_in, n_out in config.layer_dims() for bound in [n_in ** -0.5]])


def make_functions(config: BenchConfig):
    """(loss, update): ``loss(params, x, eps) -> (mean loss, (rec, kl))``, and the un-jitted
    ``update(params, m, v, t, x, eps) -> (params, m, v, loss)`` that the step compiles."""
    import jax
    import jax.numpy as jnp

    n_enc, Z = config.n_encoder, config.latent

    def mlp(layers, h):
        for i, (w, b) in enumerate(layers):
            h = h @ w + b
            if i < len(layers) - 1:
                h = jax.nn.relu(h)
        return h

    def loss(params, x, eps):
        stats = mlp(params[:n_enc], x)                     # (B, 2Z) = [mu | logvar]
        mu, logvar = stats[:, :Z], stats[:, Z:]
        z = mu + jnp.exp(0.5 * logvar) * eps
        logits = mlp(params[n_enc:], z)                    # (B, D)
        rec = jnp.sum(jax.nn.softplus(logits) - x * logits)
        kl = -0.5 * jnp.sum(1.0 + logvar - mu * mu - jnp.exp(logvar))
        return (rec + kl) / x.shape[0], (rec, kl)

    def update(params, m, v, t, x, eps):
        (value, _), grads = jax.value_and_grad(loss, has_aux=True)(params, x, eps)
        t = t + 1.0
        m = jax.tree_util.tree_map(lambda m_, g: BETA1 * m_ + (1.0 - BETA1) * g, m, grads)
        v = jax.tree_util.tree_map(lambda v_, g: BETA2 * v_ + (1.0 - BETA2) * g * g, v, grads)
        step_size = LR / (1.0 - BETA1 ** t)
        root_correction = jnp.sqrt(1.0 - BETA2 ** t)
        params = jax.tree_util.tree_map(
            lambda p, m_, v_: p - step_size * m_ / (jnp.sqrt(v_) / root_correction + EPS), params, m, v)
        return params, m, v, t, value

    return loss, update


class JaxStep:
    """``step()`` runs one jitted training step and waits for its result."""

    def __init__(self, config: BenchConfig, seed=0, images=None, flat_params=None, platform="cpu"):
        import jax
        import jax.numpy as jnp

        self.config = config
        self.platform = platform
        self.name = "jax" if platform == "cpu" else f"jax-{platform}"
        # committed arrays: jit runs where its arguments are, whatever JAX's default device is
        self.device = jax.devices(platform)[0]
        flat = init_flat(config, seed) if flat_params is None else np.asarray(flat_params, np.float32)
        params = params_from_flat(config, flat)
        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        pixels = fixed_images(config, seed) if images is None else images
        self.x = jax.device_put(pixels.astype(np.float32) / 255.0, self.device)    # prepared once
        self.loss, update = make_functions(config)
        shape = (config.batch, config.latent)

        def train_step(state, x):
            params, m, v, t, key = state
            key, sub = jax.random.split(key)
            eps = jax.random.normal(sub, shape, dtype=jnp.float32)
            params, m, v, t, value = update(params, m, v, t, x, eps)
            return (params, m, v, t, key), value

        def train_step_with_eps(state, x, eps):
            params, m, v, t, key = state
            params, m, v, t, value = update(params, m, v, t, x, eps)
            return (params, m, v, t, key), value

        self._step = jax.jit(train_step, donate_argnums=0)
        self._step_with_eps = jax.jit(train_step_with_eps, donate_argnums=0)
        self.state = jax.device_put((params, zeros, jax.tree_util.tree_map(jnp.zeros_like, params),
                                     jnp.float32(0.0), jax.random.PRNGKey(seed)), self.device)

    def step(self, eps=None):
        if eps is None:
            self.state, value = self._step(self.state, self.x)
        else:
            self.state, value = self._step_with_eps(self.state, self.x, eps)
        return value.block_until_ready()     # one executable: its outputs complete together

    __call__ = step

    @property
    def params(self):
        return self.state[0]

    def describe(self):
        import jax

        where = threads_note() if self.platform == "cpu" else self.device.device_kind
        return f"JAX {jax.__version__} jit ({self.platform}), {where}"
