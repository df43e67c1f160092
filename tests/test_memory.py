"""Resident memory stays flat over a long run: nothing grows per epoch or per step."""

import pytest

from engine_helpers import striped_digits
from test_training import make_trainer
from vaecore.config import ModelConfig, TrainConfig


def resident_bytes():
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    import os
    return pages * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
def test_resident_memory_after_epoch_10_is_within_5_percent_of_epoch_2():
    config = ModelConfig(image_shape=(1, 28, 28), hidden=(400,), latent_dim=20)
    data = striped_digits(2000, size=28)
    trainer = make_trainer("numpy", TrainConfig(batch_size=128, lr=1e-3), data, model_config=config)
    trainer.x_val = trainer.x_train[:500]
    rss = {}
    for epoch in range(1, 11):
        trainer.train_epoch(epoch)
        trainer.evaluate(trainer.x_val, seed=1)
        rss[epoch] = resident_bytes()
    assert rss[10] <= 1.05 * rss[2], {k: v / 2**20 for k, v in rss.items()}
