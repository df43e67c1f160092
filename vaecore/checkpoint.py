"""``model.npz``: weights, optimizer state, RNG state and the configs, with no pickle anywhere.

The file is a plain NumPy ``.npz`` (a zip of ``.npy`` arrays) plus one ``meta`` entry holding JSON
as a 0-d unicode array. ``meta`` records a format version and the shape and dtype of every array,
so a truncated, foreign or mismatched file is caught before anything is built from it. Arrays are
stored on the host, so a checkpoint written on one backend loads on the other.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import __version__
from .config import ModelConfig, TrainConfig, from_json, to_json
from .errors import CheckpointError, reason
from .fileio import atomic_path
from .model import parameter_count
from .npzread import read_npz_arrays

FORMAT = "vaecore-checkpoint"
VERSION = 1


@dataclass
class EpochState:
    """Where an epoch stands. A mid-epoch checkpoint stores it, so a resumed epoch sees the same
    image order and the same RNG stream, and ends bit for bit where an uninterrupted one would."""
    epoch: int               # the epoch in progress, 1-based
    order: np.ndarray        # this epoch's shuffled image indices
    step: int = 0            # steps completed
    loss_sum: float = 0.0    # summed negative ELBO of those steps
    seconds: float = 0.0     # time spent in them


@dataclass
class Checkpoint:
    model_config: ModelConfig
    train_config: TrainConfig
    arrays: dict          # name -> host NumPy array: params, adam_m, adam_v
    epoch: int            # completed epochs
    adam_step: int
    rng_state: dict       # NumPy bit generator state of the training stream
    data_name: str = ""
    epoch_state: EpochState = None   # set when saved mid-epoch


def save(path, model, optimizer, train_config, epoch, data_name="", epoch_state=None):
    """Writes the checkpoint atomically. ``epoch`` counts completed epochs; ``epoch_state`` (an
    ``EpochState``) records a partly done one."""
    backend = model.backend
    arrays = {"params": model.params, "adam_m": optimizer.m, "adam_v": optimizer.v}
    arrays = {k: np.ascontiguousarray(backend.to_host(v)) for k, v in arrays.items()}
    in_progress = None
    if epoch_state is not None:
        arrays["epoch_order"] = np.ascontiguousarray(epoch_state.order, dtype=np.int64)
        in_progress = {"epoch": epoch_state.epoch, "step": epoch_state.step,
                       "loss_sum": epoch_state.loss_sum, "seconds": epoch_state.seconds}
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "vaecore_version": __version__,
        "model": to_json(model.config),
        "train": to_json(train_config),
        "epoch": epoch,
        "adam_step": optimizer.t,
        "rng_state": backend.rng.bit_generator.state,
        "data": data_name,
        "in_progress": in_progress,
        "arrays": {k: {"shape": list(v.shape), "dtype": v.dtype.str} for k, v in arrays.items()},
    }
    path = Path(path)
    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, meta=np.array(json.dumps(meta)), **arrays)
    return path


def load(path) -> Checkpoint:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint (train a model first: python cli.py train)")
    contents = read_npz_arrays(path, CheckpointError, stored_only=True)
    meta = _read_meta(path, contents)
    arrays = {}
    for name, spec in meta["arrays"].items():
        array = contents.get(name)
        if array is None:
            raise CheckpointError(f"{path}: array {name!r} is missing")
        if list(array.shape) != spec["shape"] or array.dtype.str != spec["dtype"]:
            raise CheckpointError(f"{path}: array {name!r} is {array.dtype.str}{list(array.shape)}, "
                                  f"meta says {spec['dtype']}{spec['shape']}")
        arrays[name] = array
    try:
        model_config = from_json(ModelConfig, meta["model"]).validate()
        train_config = from_json(TrainConfig, meta["train"])
        epoch, adam_step, rng_state = int(meta["epoch"]), int(meta["adam_step"]), dict(meta["rng_state"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: incomplete metadata ({reason(e)})") from None
    expected = parameter_count(model_config)
    for name in ("params", "adam_m", "adam_v"):
        if name not in arrays or arrays[name].shape != (expected,):
            raise CheckpointError(f"{path}: {name} should hold {expected} values for this model")
    return Checkpoint(model_config, train_config, arrays, epoch, adam_step, rng_state, meta.get("data", ""),
                      _epoch_state(path, meta.get("in_progress"), arrays.get("epoch_order"), epoch))


def _epoch_state(path, in_progress, order, epoch):
    if in_progress is None:
        return None
    try:
        state = EpochState(int(in_progress["epoch"]), order, int(in_progress["step"]),
                           float(in_progress["loss_sum"]), float(in_progress["seconds"]))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable in-progress epoch ({reason(e)})") from None
    if order is None or order.ndim != 1 or state.epoch != epoch + 1 or state.step < 0:
        raise CheckpointError(f"{path}: inconsistent in-progress epoch")
    return state


def _read_meta(path, contents):
    if "meta" not in contents:
        raise CheckpointError(f"{path}: not a vaecore checkpoint (no 'meta' entry)")
    try:
        meta = json.loads(str(contents["meta"][()]))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable metadata ({reason(e)})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a vaecore checkpoint")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {meta.get('version')} is not supported "
                              f"(this vaecore reads version {VERSION})")
    if not isinstance(meta.get("arrays"), dict):
        raise CheckpointError(f"{path}: metadata lists no arrays")
    return meta
