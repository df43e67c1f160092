"""What defines a model and a training run, with the defaults and the presets.

Both configs travel inside every checkpoint as JSON, so a model can always be rebuilt and a run
resumed from the file alone.
"""

from dataclasses import asdict, dataclass, fields, replace

from .errors import VaecoreError

LIKELIHOODS = ("bernoulli", "gaussian", "gaussian-learned")
ACTIVATIONS = ("relu", "tanh")


@dataclass(frozen=True)
class ModelConfig:
    image_shape: tuple = (1, 28, 28)   # (C, H, W) of the training images
    hidden: tuple = (400,)             # encoder widths; the decoder mirrors them
    latent_dim: int = 20               # the classic Kingma & Welling MNIST setting
    likelihood: str = "bernoulli"      # on logits; grey levels act as soft targets
    gaussian_std: float = 0.1          # fixed decoder std for --likelihood gaussian (pixels in [0, 1])
    activation: str = "relu"

    @property
    def input_dim(self):
        c, h, w = self.image_shape
        return c * h * w

    def validate(self):
        if self.latent_dim < 1:
            raise VaecoreError(f"latent dimension must be at least 1, got {self.latent_dim}")
        if not self.hidden or any(h < 1 for h in self.hidden):
            raise VaecoreError(f"hidden widths must be positive integers, got {','.join(map(str, self.hidden))}")
        if self.likelihood not in LIKELIHOODS:
            raise VaecoreError(f"unknown likelihood {self.likelihood!r}; expected one of {', '.join(LIKELIHOODS)}")
        if self.activation not in ACTIVATIONS:
            raise VaecoreError(f"unknown activation {self.activation!r}; expected one of {', '.join(ACTIVATIONS)}")
        if not self.gaussian_std > 0:
            raise VaecoreError(f"--gaussian-std must be positive, got {self.gaussian_std}")
        return self


@dataclass(frozen=True)
class TrainConfig:
    data: str = "mnist"
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.0
    clip_grad: float = 0.0             # global-norm clipping; 0 turns it off
    seed: int = 0
    limit: int = 0                     # first N training images; 0 means all
    beta: float = 1.0                  # weight of the KL term (beta-VAE); 1 is the plain ELBO
    kl_warmup: int = 0                 # epochs over which the KL weight ramps linearly from 0 to beta
    iw_samples: int = 1                # K > 1 trains the importance-weighted bound (IWAE) instead of the ELBO
    binarize: bool = False             # dynamic binarization of training batches, a fixed one of validation

    def validate(self):
        if self.epochs < 1:
            raise VaecoreError(f"--epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise VaecoreError(f"--batch-size must be at least 1, got {self.batch_size}")
        if not self.lr > 0:
            raise VaecoreError(f"--lr must be positive, got {self.lr}")
        if self.clip_grad < 0 or self.weight_decay < 0:
            raise VaecoreError("--clip-grad and --weight-decay must not be negative")
        if self.limit < 0:
            raise VaecoreError(f"--limit must not be negative, got {self.limit}")
        if not self.beta > 0:
            raise VaecoreError(f"--beta must be positive, got {self.beta}")
        if self.kl_warmup < 0:
            raise VaecoreError(f"--kl-warmup must not be negative, got {self.kl_warmup}")
        if self.iw_samples < 1:
            raise VaecoreError(f"--iw-samples must be at least 1, got {self.iw_samples}")
        if self.iw_samples > 1 and (self.beta != 1.0 or self.kl_warmup):
            raise VaecoreError("--iw-samples trains the importance-weighted bound, where a KL weight has no "
                               "meaning; drop --beta and --kl-warmup, or use --iw-samples 1")
        return self


# The original NumPy project's settings: Adam, lr 1e-4, batch 4, latent 200.
PRESETS = {
    "default": ({}, {}),
    "seed": ({"latent_dim": 200, "hidden": (400,)}, {"lr": 1e-4, "batch_size": 4}),
}


def to_json(config):
    return asdict(config)


def from_json(cls, data):
    """Rebuilds a config from a checkpoint, ignoring keys a newer version may have added."""
    known = {f.name for f in fields(cls)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known}
    return replace(cls(), **values)
