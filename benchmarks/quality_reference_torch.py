"""The quality bar's reference: the default vaecore network trained the same way in PyTorch.

784-400-20 MLP VAE, Bernoulli likelihood on logits, Adam lr 1e-3, batch 128, 10 epochs on MNIST (from
vaecore's cache), optionally with dynamic binarization. Prints the test negative ELBO (one z sample per
image) per epoch, to set beside `python cli.py train` and `python cli.py evaluate`. Needs torch, which is
never a dependency of vaecore:

    pip install torch==2.13.0
    python benchmarks/quality_reference_torch.py [--binarize] [--seed 0]
"""

import argparse

import numpy as np
import torch
from torch import nn

from vaecore.binarize import TEST_SEED, binarize_fixed
from vaecore.data import load_dataset


class VAE(nn.Module):
    def __init__(self, d=784, h=400, z=20):
        super().__init__()
        self.z = z
        self.encoder = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, 2 * z))
        self.decoder = nn.Sequential(nn.Linear(z, h), nn.ReLU(), nn.Linear(h, d))

    def loss_sum(self, x):
        stats = self.encoder(x)
        mu, logvar = stats[:, :self.z], stats[:, self.z:]
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        rec = nn.functional.binary_cross_entropy_with_logits(self.decoder(z), x, reduction="sum")
        kl = -0.5 * torch.sum(1 + logvar - mu * mu - logvar.exp())
        return rec + kl


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--binarize", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    data = load_dataset("mnist", log=lambda message: None)
    x_train = torch.from_numpy(data.x_train.reshape(len(data.x_train), -1).astype(np.float32) / 255)
    x_test = binarize_fixed(data.x_test, TEST_SEED) if args.binarize else data.x_test
    x_test = torch.from_numpy(x_test.reshape(len(x_test), -1).astype(np.float32) / 255)
    model = VAE()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for epoch in range(1, args.epochs + 1):
        total = 0.0
        for idx in torch.randperm(len(x_train)).split(128):
            x = x_train[idx]
            if args.binarize:
                x = torch.bernoulli(x)
            loss = model.loss_sum(x)
            optimizer.zero_grad()
            (loss / len(x)).backward()
            optimizer.step()
            total += loss.item()
        with torch.no_grad():
            test = sum(model.loss_sum(x).item() for x in x_test.split(1000)) / len(x_test)
        print(f"epoch {epoch:2d}  train {total / len(x_train):7.2f}  test negative ELBO {test:7.2f}", flush=True)


if __name__ == "__main__":
    main()
