"""vaecore: a variational autoencoder whose maths is written once and runs on NumPy or CuPy."""

__version__ = "0.1.0"
