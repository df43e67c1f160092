"""Training: the step, the epoch, validation, and the run directory that records it all.

A run directory holds ``model.npz`` (saved after every epoch), ``metrics.jsonl`` (one JSON line per
epoch) and per-epoch pictures. Everything needed to continue -- weights, Adam state, the training
RNG's state and the configs -- is in the checkpoint, so ``resume`` picks up exactly where the last
completed epoch left off.
"""

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import checkpoint, images, inference
from .binarize import TEST_SEED, DynamicBinarizer, binarize_fixed
from .config import ModelConfig, TrainConfig
from .cpu_replay import ReplayedStep
from .cuda_graph import GraphedStep
from .errors import VaecoreError
from .fileio import atomic_write_text
from .checkpoint import EpochState
from .iwae import ImportanceWeightedObjective
from .model import VAE
from .optim import Adam

EVAL_CHUNK = 1000
PANEL_IMAGES = 8          # reconstruction panel width
SAMPLE_GRID = 64          # prior samples drawn each epoch, always from the same z


class TrainingDiverged(VaecoreError):
    pass


class Interrupted(VaecoreError):
    """SIGINT or SIGTERM arrived; the exit status follows the shell's 128 + signal convention."""

    def __init__(self, signum, epoch, step, saved=None):
        self.signum, self.epoch, self.step = signum, epoch, step
        self.exit_code = 128 + signum
        where = f"after epoch {epoch}" if step == 0 else f"at epoch {epoch}, step {step}"
        saved_note = f"; saved {saved}, continue with --resume" if saved else ""
        super().__init__(f"interrupted {where}{saved_note}")


@dataclass
class RunPaths:
    root: Path

    @property
    def checkpoint(self):
        return self.root / "model.npz"

    @property
    def metrics(self):
        return self.root / "metrics.jsonl"

    def reconstructions(self, epoch):
        return self.root / f"reconstructions_epoch{epoch:03d}.png"

    def samples(self, epoch):
        return self.root / f"samples_epoch{epoch:03d}.png"

    def remove_pictures(self):
        for pattern in ("reconstructions_epoch*.png", "samples_epoch*.png"):
            for path in self.root.glob(pattern):
                path.unlink(missing_ok=True)


class Trainer:
    """Owns the model, its optimizer and the host-side batch buffers for one data set."""

    def __init__(self, model: VAE, optimizer: Adam, config: TrainConfig, x_train, x_val, cuda_graphs=True,
                 cpu_replay=True):
        self.model, self.optimizer, self.config = model, optimizer, config
        self.backend = model.backend
        self.x_train = x_train.reshape(len(x_train), -1)     # uint8 (N, D), stays on the host
        self.x_val = x_val.reshape(len(x_val), -1)
        self._host_batches = {}                              # uint8 gather buffers by batch size
        self._binarize = DynamicBinarizer()
        # K > 1: the importance-weighted bound replaces the ELBO (K = 1 would be the ELBO, done below)
        self.objective = ImportanceWeightedObjective(model, config.iw_samples) if config.iw_samples > 1 else None
        # each layer updated inside the backward pass where the kernels fuse that (None with clipping)
        self._layer_updates = optimizer.layer_updates(model.params, model.grads, model.param_blocks)
        # on a GPU, the ELBO step recorded once per batch size as a CUDA graph (see cuda_graph.py)
        self.graphed_step = None
        if cuda_graphs and self.backend.name == "cupy" and self.backend.kernels.name == "cuda" and not self.objective:
            self.graphed_step = GraphedStep(model, optimizer)
        # on the CPU, the step's kernel launches recorded once per batch size and replayed where they are
        # the whole step (see cpu_replay.py)
        self.replayed_step = None
        if (cpu_replay and self.backend.name == "numpy" and self.backend.kernels.name == "cpu" and not self.objective
                and self._layer_updates is not None):
            self.replayed_step = ReplayedStep(model, optimizer, self._layer_updates)
        if len(self.x_train) < config.batch_size:
            raise VaecoreError(f"the training set has {len(self.x_train)} images, fewer than one batch "
                               f"of {config.batch_size}; lower --batch-size or raise --limit")

    def _host_batch(self, n):
        buf = self._host_batches.get(n)
        if buf is None:
            buf = self._host_batches[n] = np.empty((n, self.x_train.shape[1]), dtype=np.uint8)
        return buf

    def train_step(self, batch, kl_weight=1.0):
        """One step on a uint8 (B, D) host batch: returns (rec_sum, kl_sum, grad_norm).

        The gradient is that of ``rec + kl_weight * kl`` (beta, KL warm-up); the sums returned are
        unweighted, so their total is the negative ELBO. With ``--iw-samples K > 1`` it is the
        negative importance-weighted bound instead, returned as ``rec_sum`` with ``kl_sum`` 0.
        """
        model, backend = self.model, self.backend
        scale = 1.0 / len(batch)                     # the loss is the mean over the batch
        ws = (self.objective or model).workspace(len(batch))
        if self.graphed_step is not None:
            return self.graphed_step(ws, batch, scale, kl_weight)
        backend.images_into(ws.x, batch)
        backend.normal_into(ws.eps, ws.eps_host)
        if self.replayed_step is not None and self.replayed_step.handles(len(batch)):
            return self.replayed_step(ws, scale, kl_weight)
        if self.objective is not None:
            rec, kl = self.objective.loss_and_backward(ws, grad_scale=scale), 0.0
        else:
            rec, kl = model.loss(ws, grad_scale=scale)
            update = self._layer_updates
            if update is not None and backend.kernels.fuses_layer_adam(len(batch)):
                update.start()
                model.backward(ws, kl_weight=kl_weight, grad_scale=scale, update=update)
                return rec, kl, update.norm()
            model.backward(ws, kl_weight=kl_weight, grad_scale=scale)
        grad_norm = self.optimizer.step(model.params, model.grads, model.param_blocks)
        return rec, kl, grad_norm

    def kl_weight(self, epoch, step, steps):
        """beta, ramped linearly from 0 over the first ``kl_warmup`` epochs, step by step."""
        config = self.config
        if config.kl_warmup <= 0:
            return config.beta
        return config.beta * min(1.0, (epoch - 1 + (step + 1) / steps) / config.kl_warmup)

    def start_epoch(self, epoch):
        return EpochState(epoch, self.backend.rng.permutation(len(self.x_train)))

    def run_epoch(self, state, progress=None, stop=None):
        """Runs the rest of ``state``'s epoch; returns the mean negative ELBO per image.

        ``state`` is updated after every step, so when ``stop()`` turns true (checked between steps)
        the :class:`Interrupted` raised leaves it describing exactly the steps completed.
        """
        # overflow shows up as a non-finite loss, which is reported below with the epoch and step
        with np.errstate(all="ignore"):
            return self._run_steps(state, progress, stop)

    def _run_steps(self, state, progress, stop):
        n, batch_size = len(self.x_train), self.config.batch_size
        steps = -(-n // batch_size)
        while state.step < steps:
            started = time.perf_counter()
            idx = state.order[state.step * batch_size:(state.step + 1) * batch_size]
            batch = self._host_batch(len(idx))
            np.take(self.x_train, idx, axis=0, out=batch)
            if self.config.binarize:
                self._binarize(batch, self.backend.rng)   # the training stream: resumable
            rec, kl, grad_norm = self.train_step(batch, self.kl_weight(state.epoch, state.step, steps))
            loss, grad_norm = float(rec) + float(kl), float(grad_norm)
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                raise TrainingDiverged(
                    f"training diverged at epoch {state.epoch}, step {state.step + 1}: the loss or gradient "
                    f"became {'NaN' if math.isnan(loss) or math.isnan(grad_norm) else 'infinite'}; "
                    f"try a lower --lr (now {self.config.lr:g}) or --clip-grad")
            state.step += 1
            state.loss_sum += loss
            state.seconds += time.perf_counter() - started
            if progress is not None:
                progress(state.step, steps, loss / len(idx))
            if stop is not None and stop():
                raise Interrupted(stop(), state.epoch, state.step)
        return state.loss_sum / n

    def train_epoch(self, epoch, progress=None):
        """One whole pass over the shuffled training set; returns the mean negative ELBO per image."""
        return self.run_epoch(self.start_epoch(epoch), progress)

    def evaluate(self, x, seed):
        """Mean negative ELBO (one z sample per image, noise from ``seed``), MSE of the posterior-mean
        reconstruction, and KL, per image, over uint8 images (N, D)."""
        model, backend = self.model, self.backend
        xp, z_dim = backend.xp, model.config.latent_dim
        rng = np.random.default_rng(seed)
        rec_total = kl_total = se_total = 0.0
        for start in range(0, len(x), EVAL_CHUNK):
            chunk = x[start:start + EVAL_CHUNK]
            ws = model.workspace(len(chunk))
            backend.images_into(ws.x, chunk)
            backend.normal_into(ws.eps, ws.eps_host, rng=rng)
            rec, kl = model.loss(ws)
            rec_total, kl_total = rec_total + float(rec), kl_total + float(kl)
            ws.z[...] = ws.stats[:, :z_dim]
            model.decode(ws)
            diff = model.mean_image(ws.out) - ws.x
            se_total += float(xp.sum(diff * diff))
        n = max(len(x), 1)
        return {"val_loss": (rec_total + kl_total) / n, "recon_mse": se_total / (n * x.shape[1]),
                "kl": kl_total / n}


def format_header():
    return f"{'epoch':>5}  {'train_loss':>10}  {'val_loss':>9}  {'recon_mse':>9}  {'kl':>7}  {'seconds':>7}  {'samples/s':>9}"


def format_row(r):
    return (f"{r['epoch']:>5}  {r['train_loss']:>10.2f}  {r['val_loss']:>9.2f}  {r['recon_mse']:>9.5f}  "
            f"{r['kl']:>7.2f}  {r['seconds']:>7.1f}  {r['samples_per_s']:>9.0f}")


def read_metrics(path, up_to_epoch):
    """The metrics lines of epochs already in the checkpoint (later ones belong to a lost future)."""
    if not Path(path).exists():
        return []
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("epoch", 0) <= up_to_epoch:
            records.append(record)
    return records


def run_training(run_dir, model_config: ModelConfig, train_config: TrainConfig, backend, dataset,
                 resume=False, log=print, progress_factory=None, stop=None):
    """Trains for ``train_config.epochs`` epochs (continuing a checkpoint when ``resume``).

    ``progress_factory(epoch)`` returns a callable ``(step, steps, loss)`` or None. ``stop()`` is
    polled between steps; when it returns a signal number, the last completed step is saved and
    :class:`Interrupted` is raised. Returns the list of per-epoch metric records.
    """
    paths = RunPaths(Path(run_dir))
    try:
        paths.root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise VaecoreError(f"cannot write to {paths.root}: {e.strerror or e}") from None
    model = VAE(model_config, backend, init_seed=train_config.seed)
    optimizer = Adam(backend, model.n_params, lr=train_config.lr, beta1=train_config.beta1,
                     beta2=train_config.beta2, weight_decay=train_config.weight_decay,
                     clip_norm=train_config.clip_grad)
    completed, records, state = 0, [], None
    if resume:
        ckpt = checkpoint.load(paths.checkpoint)
        restore(model, optimizer, ckpt)
        completed, state = ckpt.epoch, ckpt.epoch_state
        records = read_metrics(paths.metrics, completed)
        if completed >= train_config.epochs:
            log(f"{paths.checkpoint} already has {completed} epochs; pass --epochs N with N > {completed} to go on")
            return records
        log(f"resuming {paths.checkpoint} " + (f"at epoch {state.epoch}, step {state.step}" if state
                                               else f"after epoch {completed}"))
    # --binarize: validation always scores the same binarization, so epochs and runs compare
    x_val = binarize_fixed(dataset.x_test, TEST_SEED) if train_config.binarize else dataset.x_test
    trainer = Trainer(model, optimizer, train_config, dataset.x_train, x_val)
    backend.warm_up()         # compile (or load) the kernels now, not inside epoch 1's timing
    if state is not None and not np.array_equal(np.sort(state.order), np.arange(len(trainer.x_train))):
        raise VaecoreError(f"{paths.checkpoint} was interrupted on {len(state.order)} training images, "
                           f"the data now has {len(trainer.x_train)}")
    panel = x_val[:PANEL_IMAGES] if len(x_val) else dataset.x_train[:PANEL_IMAGES]

    def save(epoch, epoch_state=None):
        return checkpoint.save(paths.checkpoint, model, optimizer, train_config, epoch,
                               data_name=dataset.name, epoch_state=epoch_state)

    log(format_header())
    for record in records:
        log(format_row(record))
    for epoch in range(completed + 1, train_config.epochs + 1):
        state = state if state is not None else trainer.start_epoch(epoch)
        progress = progress_factory(epoch) if progress_factory else None
        try:
            train_loss = trainer.run_epoch(state, progress, stop)
        except Interrupted as e:
            raise Interrupted(e.signum, e.epoch, e.step, saved=save(epoch - 1, state)) from None
        backend.synchronize()
        val = trainer.evaluate(trainer.x_val, seed=train_config.seed + 1) if len(trainer.x_val) else \
            {"val_loss": float("nan"), "recon_mse": float("nan"), "kl": float("nan")}
        record = {"epoch": epoch, "train_loss": train_loss, **val, "seconds": state.seconds,
                  "samples_per_s": len(trainer.x_train) / max(state.seconds, 1e-9)}
        records.append(record)
        if epoch == 1:
            paths.remove_pictures()        # an --overwrite run must not leave the old run's later epochs
        images.save_png(images.comparison(panel, inference.reconstruct(model, panel)), paths.reconstructions(epoch))
        images.save_png(images.grid(inference.sample(model, SAMPLE_GRID, seed=train_config.seed + 2), ncols=8,
                                    scale=2), paths.samples(epoch))
        save(epoch)
        atomic_write_text(paths.metrics, "".join(json.dumps(r) + "\n" for r in records))
        log(format_row(record))
        state = None
        if stop is not None and stop():
            raise Interrupted(stop(), epoch, 0, saved=paths.checkpoint)
    return records


def restore(model, optimizer, ckpt):
    backend = model.backend
    backend.copy_from_host(model.params, ckpt.arrays["params"])
    backend.copy_from_host(optimizer.m, ckpt.arrays["adam_m"])
    backend.copy_from_host(optimizer.v, ckpt.arrays["adam_v"])
    optimizer.t = ckpt.adam_step
    backend.rng.bit_generator.state = ckpt.rng_state


def load_model(path, backend):
    """The model stored in a checkpoint, ready for inference on ``backend``."""
    ckpt = checkpoint.load(path)
    model = VAE(ckpt.model_config, backend)
    backend.copy_from_host(model.params, ckpt.arrays["params"])
    return model, ckpt
