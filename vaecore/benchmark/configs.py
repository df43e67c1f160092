"""The three named configurations of the speed comparison, and the matmul work of one training step.

The table is the one in ``DESIGN.md`` ("Speed is measured, not asserted"); every benchmark, the
reference networks and ``vaecore bench`` read it from here so the names mean the same everywhere.

The network is the engine's: an MLP encoder ``input -> hidden... (ReLU) -> 2 * latent`` (mean and
log-variance from one matmul) and a decoder ``latent -> reversed hidden... (ReLU) -> input`` logits,
Bernoulli likelihood, Adam. One training step runs, per layer of ``n_in -> n_out`` and batch ``B``:

* forward            ``x @ W``          (B, n_in) @ (n_in, n_out)
* weight gradient    ``x.T @ delta``    (n_in, B) @ (B, n_out)
* data gradient      ``delta @ W.T``    (B, n_out) @ (n_out, n_in) -- for every layer except the
  encoder's first, whose input is the data

each ``2 * B * n_in * n_out`` floating-point operations.
"""

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BenchConfig:
    name: str
    input_dim: int       # pixels per image (784 for MNIST)
    hidden: tuple        # encoder widths; the decoder mirrors them
    latent: int          # size of z
    batch: int           # images per step

    def layer_dims(self):
        """(n_in, n_out) of every layer, encoder first, then decoder (as :func:`vaecore.model.layer_dims`)."""
        encoder = [self.input_dim, *self.hidden, 2 * self.latent]
        decoder = [self.latent, *reversed(self.hidden), self.input_dim]
        return [(a, b) for dims in (encoder, decoder) for a, b in zip(dims, dims[1:])]

    @property
    def n_encoder(self):
        return len(self.hidden) + 1

    def model_config(self):
        """The engine's :class:`vaecore.config.ModelConfig` of this network (square grayscale images)."""
        from ..config import ModelConfig

        side = int(round(self.input_dim ** 0.5))
        shape = (1, side, side) if side * side == self.input_dim else (1, 1, self.input_dim)
        return ModelConfig(image_shape=shape, hidden=tuple(self.hidden), latent_dim=self.latent)

    def describe(self):
        return (f"{self.input_dim}-{','.join(map(str, self.hidden))}-{self.latent}, batch {self.batch}, "
                f"{parameter_count(self):,} parameters")


CONFIGS = {
    "seed-b4": BenchConfig("seed-b4", 784, (400,), 200, 4),
    "example-b128": BenchConfig("example-b128", 784, (400,), 20, 128),
    "wide-b512": BenchConfig("wide-b512", 784, (1024, 1024), 64, 512),
}

LR, BETA1, BETA2, EPS = 1e-3, 0.9, 0.999, 1e-8     # Adam, identical in all three implementations


def config_by_name(name):
    try:
        return CONFIGS[name]
    except KeyError:
        raise KeyError(f"unknown configuration {name!r}; expected one of {', '.join(CONFIGS)}") from None


def parse_config_names(text):
    """``"seed-b4,wide-b512"`` -> ("seed-b4", "wide-b512"); ``ValueError`` naming an unknown one."""
    names = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [n for n in names if n not in CONFIGS]
    if not names or unknown:
        raise ValueError(f"unknown configuration {unknown[0]!r}" if unknown else "no configuration given")
    return names


def parameter_count(config: BenchConfig):
    return sum(n_in * n_out + n_out for n_in, n_out in config.layer_dims())


@dataclass(frozen=True)
class MatmulShape:
    """``a @ b`` of shapes (m, k) @ (k, n), with ``a_transposed`` / ``b_transposed`` saying which
    operand is a transposed view in the engine (``x.T`` in the weight gradient, ``W.T`` in the data
    gradient), since BLAS speed depends on the layout too."""
    label: str
    m: int
    k: int
    n: int
    a_transposed: bool = False
    b_transposed: bool = False

    @property
    def flops(self):
        return 2 * self.m * self.k * self.n


def step_matmul_shapes(config: BenchConfig):
    """Every matmul of one training step, in the order the engine runs them."""
    B, dims = config.batch, config.layer_dims()
    names = [f"enc{i}" for i in range(config.n_encoder)] + [f"dec{i}" for i in range(len(dims) - config.n_encoder)]
    shapes = [MatmulShape(f"{name} forward x@W", B, n_in, n_out) for name, (n_in, n_out) in zip(names, dims)]
    for i in reversed(range(len(dims))):                # backward: decoder first, last layer first
        n_in, n_out = dims[i]
        shapes.append(MatmulShape(f"{names[i]} weight grad x.T@delta", n_in, B, n_out, a_transposed=True))
        if i != 0:                                      # the encoder's first input is the data
            shapes.append(MatmulShape(f"{names[i]} data grad delta@W.T", B, n_out, n_in, b_transposed=True))
    return shapes


def step_matmul_flops(config: BenchConfig):
    """Floating-point operations of one step's matmuls: ``2 B (3 sum(n_in n_out) - input_dim hidden[0])``."""
    return sum(shape.flops for shape in step_matmul_shapes(config))


def fixed_images(config: BenchConfig, seed=0):
    """The batch every implementation trains on: fixed random uint8 pixels (B, input_dim)."""
    return np.random.default_rng(seed).integers(0, 256, (config.batch, config.input_dim), dtype=np.uint8)
