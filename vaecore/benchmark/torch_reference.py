"""The same network and training step in PyTorch: eager mode, float32, ``torch.optim.Adam``, on the CPU
(``torch``) or on the GPU that CuPy uses (``torch-cuda``, compared with ``ours-cupy``).

Written the way a PyTorch user would write it (``nn.Linear`` layers, ``binary_cross_entropy_with_logits``
summed, autograd, the optimizer's own update), with PyTorch's fastest Adam (``fused=True``, on either device). The
inputs are float32 pixels prepared once; the noise is drawn inside every step (``torch.randn``).
PyTorch is never a dependency of vaecore: everything here imports it lazily, and :func:`status` says
why it cannot run.
"""

from ..errors import reason
from .configs import BETA1, BETA2, EPS, LR, BenchConfig, fixed_images

INSTALL = "pip install torch==2.13.0"


def status():
    """(usable, detail): PyTorch's version, or why it cannot be used."""
    try:
        import torch
    except ImportError:
        return False, f"PyTorch is not installed ({INSTALL})"
    except Exception as e:   # a broken install raises all sorts of errors at import
        return False, f"PyTorch failed to import: {reason(e)}"
    return True, f"torch {torch.__version__}"


def cuda_status():
    """(usable, detail): like :func:`status`, and whether this PyTorch build reaches a CUDA device."""
    usable, detail = status()
    if not usable:
        return usable, detail
    import torch

    if not torch.cuda.is_available():
        return False, (f"PyTorch {torch.__version__} finds no CUDA device (a CPU build, or no GPU here); "
                       f"for a GPU build see pytorch.org")
    return True, f"{detail}, {torch.cuda.get_device_name(0)}"


def build_module(config: BenchConfig):
    """An ``nn.Module`` with ``encoder``/``decoder`` stacks and ``loss(x, eps) -> (mean loss, rec, kl)``."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    def mlp(dims):
        layers = []
        for i, (n_in, n_out) in enumerate(zip(dims, dims[1:])):
            layers.append(nn.Linear(n_in, n_out))
            if i < len(dims) - 2:
                layers.append(nn.ReLU())
        return nn.Sequential(*layers)

    class TorchVAE(nn.Module):
        def __init__(self):
            super().__init__()
            self.latent = config.latent
            self.encoder = mlp([config.input_dim, *config.hidden, 2 * config.latent])
            self.decoder = mlp([config.latent, *reversed(config.hidden), config.input_dim])

        def loss(self, x, eps):
            stats = self.encoder(x)                                   # (B, 2Z) = [mu | logvar]
            mu, logvar = stats[:, :self.latent], stats[:, self.latent:]
            z = mu + torch.exp(0.5 * logvar) * eps
            logits = self.decoder(z)                                  # (B, D)
            rec = F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
            kl = -0.5 * torch.sum(1.0 + logvar - mu * mu - torch.exp(logvar))
            return (rec + kl) / x.shape[0], rec, kl

        def linears(self):
            return [m for m in (*self.encoder, *self.decoder) if isinstance(m, nn.Linear)]

    return TorchVAE()


def load_flat(module, flat):
    """Copies the engine's flat parameter layout (per layer: W (n_in, n_out) row-major, then b) in."""
    import torch

    offset = 0
    with torch.no_grad():
        for linear in module.linears():
            n_out, n_in = linear.weight.shape
            w = flat[offset:offset + n_in * n_out].reshape(n_in, n_out)
            linear.weight.copy_(torch.from_numpy(w.T.copy()))
            offset += n_in * n_out
            linear.bias.copy_(torch.from_numpy(flat[offset:offset + n_out].copy()))
            offset += n_out


def to_flat(module, grads=False):
    """Parameters (or their gradients) in the engine's flat layout, as a float32 NumPy array."""
    import numpy as np

    parts = []
    for linear in module.linears():
        w, b = (linear.weight.grad, linear.bias.grad) if grads else (linear.weight, linear.bias)
        parts += [w.detach().cpu().numpy().T.ravel(), b.detach().cpu().numpy().ravel()]
    return np.concatenate(parts).astype(np.float32)


def default_threads():
    """The thread count to give PyTorch: what NumPy's BLAS uses (the cores), so the race is even."""
    import os

    try:
        from threadpoolctl import threadpool_info

        blas = [p["num_threads"] for p in threadpool_info() if p.get("user_api") == "blas"]
        if blas:
            return blas[0]
    except ImportError:
        pass
    return os.cpu_count() or 1


class TorchStep:
    """``step()`` runs one training step: zero grads, forward with fresh noise, backward, Adam."""

    def __init__(self, config: BenchConfig, seed=0, images=None, threads=None, flat_params=None,
                 adam_impl="fused", device="cpu"):
        import torch

        self.config = config
        self.device = torch.device(device)
        self.name = "torch" if self.device.type == "cpu" else f"torch-{self.device.type}"
        self.threads = threads or default_threads()
        torch.set_num_threads(self.threads)
        torch.manual_seed(seed)
        self.module = build_module(config)
        if flat_params is not None:
            load_flat(self.module, flat_params)
        self.module.to(self.device)
        # a GPU step has only been queued when step() returns; the timers need it done
        self._synchronize = torch.cuda.synchronize if self.device.type == "cuda" else None
        pixels = fixed_images(config, seed) if images is None else images
        self.x = torch.from_numpy(pixels.astype("float32") / 255.0).to(self.device)        # prepared once
        self.adam_impl = adam_impl
        options = {"fused": True} if adam_impl == "fused" else {"foreach": adam_impl == "foreach"}
        self.optimizer = torch.optim.Adam(self.module.parameters(), lr=LR, betas=(BETA1, BETA2), eps=EPS,
                                          **options)
        self._eps_shape = (config.batch, config.latent)

    def step(self, eps=None):
        import torch

        self.optimizer.zero_grad(set_to_none=True)
        noise = torch.randn(self._eps_shape, device=self.device) if eps is None else eps
        loss, _, _ = self.module.loss(self.x, noise)
        loss.backward()
        self.optimizer.step()
        if self._synchronize is not None:
            self._synchronize()
        return loss.detach()

    __call__ = step

    def describe(self):
        import torch

        where = (f"{self.threads} threads (torch.set_num_threads)" if self.device.type == "cpu"
                 else torch.cuda.get_device_name(self.device))
        return f"PyTorch {torch.__version__} eager, {where}, Adam {self.adam_impl}"
