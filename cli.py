"""The vaecore command line: ``python cli.py COMMAND`` (or ``vaecore COMMAND`` once installed).

This file only parses flags, builds the backend and the configs, calls into ``vaecore`` and prints
what happened. Problems the user can fix arrive as ``VaecoreError`` and become one line on stderr
with a non-zero exit; anything else is a bug and keeps its traceback.
"""

import argparse
import json
import os
import platform
import signal
import sys
import warnings
from dataclasses import replace
from pathlib import Path

DEFAULT_RUN = Path("runs") / "vae"


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (exit 2) instead of the usage block."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def non_negative_float(text):
    return 0.0 if text.strip() in ("0", "0.0") else positive_float(text)


def non_negative_int(text):
    return 0 if text.strip() == "0" else positive_int(text)


def dimensions(text):
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected latent dimensions like 0,1,2, got {text!r}") from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"latent dimensions count from 0, got {text!r}")
    return values


def bench_configs(text):
    from vaecore.benchmark.configs import CONFIGS, parse_config_names

    try:
        return parse_config_names(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{e}; expected names from {', '.join(CONFIGS)} separated by commas") from None


def widths(text):
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected widths like 400 or 1024,1024, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive widths like 400 or 1024,1024, got {text!r}")
    return values


def build_parser():
    from vaecore.backend import BACKENDS
    from vaecore.config import ACTIVATIONS, LIKELIHOODS, PRESETS
    from vaecore.images import FIT_CHOICES, INVERT_CHOICES

    parser = OneLineParser(prog="vaecore", description="Train, use and inspect variational autoencoders on "
                           "MNIST-like images, on NumPy (CPU) or CuPy (GPU).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=OneLineParser)

    def backend_flag(p):
        p.add_argument("--backend", choices=BACKENDS, default="auto",
                       help="array library: numpy (CPU), cupy (NVIDIA GPU) or auto (CuPy when a GPU answers, "
                            "else NumPy; default)")

    def data_flags(p, default):
        p.add_argument("--data", default=default, metavar="SOURCE",
                       help="mnist, fashion-mnist, a folder of IDX files, a folder of images (one sub-folder "
                            "per class, or flat), or an .npz with x_train [x_test y_train y_test]"
                            + (f" (default: {default})" if default else " (default: the data the model was trained on)"))
        if default:   # a trained model decides its own image size and channels
            p.add_argument("--image-size", type=positive_int, default=28, metavar="PX",
                           help="side length image folders are resized to (default 28)")
            p.add_argument("--channels", type=int, choices=(1, 3), default=1,
                           help="1 for grayscale (default) or 3 for RGB, for image folders")
        p.add_argument("--skip-bad", action="store_true", help="skip unreadable images in an image folder "
                       "instead of stopping")

    def picture_flags(p, what):
        """How predict and interpolate prepare the user's pictures."""
        p.add_argument("--invert", choices=INVERT_CHOICES, default="auto",
                       help=f"invert {what}: auto (when the border is light; default), yes or no")
        p.add_argument("--fit", choices=FIT_CHOICES, default="center",
                       help="center: crop to the drawing and centre it with a margin as MNIST was made "
                            "(default); stretch: resize the whole picture")

    def png_flags(p, scale, default_name):
        p.add_argument("--scale", type=positive_int, default=scale,
                       help=f"enlargement of the output picture (default {scale})")
        p.add_argument("--out", type=Path, metavar="PNG",
                       help=f"output file (default: {default_name} beside the checkpoint)")

    def model_flags(p):
        """Which trained model a command uses, and where it runs."""
        p.add_argument("--checkpoint", type=Path, default=DEFAULT_RUN / "model.npz", metavar="PATH",
                       help=f"the trained model (default {DEFAULT_RUN / 'model.npz'})")
        backend_flag(p)

    t = commands.add_parser("train", help="train a VAE and write a run directory",
                            description="Train a VAE. Prints one line per epoch (negative ELBO in nats per "
                            "image for train and validation, reconstruction MSE, KL, time, throughput) and "
                            "writes model.npz, metrics.jsonl and per-epoch pictures into --out.")
    backend_flag(t)
    data_flags(t, "mnist")
    t.add_argument("--preset", choices=sorted(PRESETS), default="default",
                   help="starting settings: default (784-400-20, Adam lr 1e-3, batch 128) or seed (the "
                        "original project's: latent 200, lr 1e-4, batch 4); flags given explicitly win")
    t.add_argument("--epochs", type=positive_int, help="number of epochs (default 10); with --resume, the total to reach")
    t.add_argument("--batch-size", type=positive_int, help="images per step (default 128)")
    t.add_argument("--lr", type=positive_float, help="Adam learning rate (default 1e-3)")
    t.add_argument("--latent-dim", type=positive_int, help="size of z (default 20)")
    t.add_argument("--hidden", type=widths, metavar="W[,W...]", help="hidden layer widths of the encoder, "
                   "mirrored in the decoder (default 400)")
    t.add_argument("--likelihood", choices=LIKELIHOODS, help="decoder distribution: bernoulli on logits "
                   "(default), gaussian with fixed --gaussian-std, or gaussian-learned (per-pixel variance)")
    t.add_argument("--gaussian-std", type=positive_float, help="decoder std for --likelihood gaussian (default 0.1)")
    t.add_argument("--activation", choices=ACTIVATIONS, help="hidden activation (default relu)")
    t.add_argument("--beta", type=positive_float, help="weight of the KL term, as in the beta-VAE: the "
                   "gradient is that of rec + beta * KL (default 1, the plain ELBO); train_loss and val_loss "
                   "still report the unweighted negative ELBO")
    t.add_argument("--kl-warmup", type=non_negative_int, metavar="EPOCHS", help="KL annealing: ramp the KL "
                   "weight linearly from 0 to --beta over the first EPOCHS epochs, step by step (default 0, "
                   "no warm-up)")
    t.add_argument("--iw-samples", type=positive_int, metavar="K", help="train the importance-weighted bound "
                   "(IWAE, Burda et al. 2016) with K samples per image instead of the ELBO; train_loss then "
                   "reports the negative bound, val_loss still the negative ELBO (default 1, the plain "
                   "ELBO; a step costs about K times more in the decoder). Not with --beta or --kl-warmup")
    t.add_argument("--binarize", action="store_true", default=None, help="binarized data, the density-"
                   "estimation setting of the VAE literature: every training batch is redrawn as 0/255 "
                   "pixels with probability pixel/255 (dynamic binarization), the validation split is "
                   "binarized once with a fixed seed; evaluate then scores the binarized test split")
    t.add_argument("--clip-grad", type=non_negative_float, metavar="NORM",
                   help="clip the global gradient norm to NORM (default off)")
    t.add_argument("--weight-decay", type=non_negative_float, help="decoupled (AdamW) weight decay (default 0)")
    t.add_argument("--seed", type=int, help="seed for initialization, shuffling and noise (default 0)")
    t.add_argument("--limit", type=positive_int, metavar="N", help="train on the first N training images only")
    t.add_argument("--out", type=Path, default=DEFAULT_RUN, metavar="DIR", help=f"run directory (default {DEFAULT_RUN})")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last completed "
                   "step, with its own settings (only --epochs may change)")
    t.add_argument("--overwrite", action="store_true", help="start a new run in --out even if it holds a "
                   "model (its checkpoint, metrics and pictures are replaced)")

    p = commands.add_parser("predict", help="reconstruct your own images",
                            description="Reconstruct images with a trained model: each picture is converted "
                            "to the model's channels and size (inverted when it is dark ink on a light "
                            "background), encoded to its posterior mean and decoded. Writes one PNG per "
                            "input with the original and the reconstruction side by side, and prints its "
                            "path and the mean squared error.")
    p.add_argument("images", nargs="+", type=Path, metavar="IMG", help="image files (PNG, JPEG, anything Pillow reads)")
    model_flags(p)
    picture_flags(p, "the picture")
    p.add_argument("--scale", type=positive_int, default=8, help="enlargement of the output picture (default 8)")
    p.add_argument("--out", type=Path, metavar="DIR", help="where to write (default: predictions/ beside the checkpoint)")

    s = commands.add_parser("sample", help="draw images from the prior",
                            description="Decode z ~ N(0, I) into a grid of images.")
    model_flags(s)
    s.add_argument("--n", type=positive_int, default=64, help="number of samples (default 64)")
    s.add_argument("--seed", type=int, default=0, help="seed for z (default 0)")
    png_flags(s, 3, "samples.png")

    e = commands.add_parser("evaluate", help="score a model on the test split",
                            description="Score a model on the test split: negative ELBO (nats per image, one "
                            "z sample per image), posterior-mean reconstruction MSE, KL, the number of active "
                            "latent units (posterior mean varying across images, Cov > 0.01), and the "
                            "importance-sampled estimate of the negative log-likelihood -log p(x) with K "
                            "samples per image (an upper bound that tightens as K grows). With --json, one "
                            "line with the keys test_loss, recon_mse, kl, active_units, nll_is, iw_samples, n.")
    model_flags(e)
    data_flags(e, None)
    e.add_argument("--seed", type=int, default=0, help="seed for the z samples (default 0)")
    e.add_argument("--iw-samples", type=non_negative_int, default=1000, metavar="K",
                   help="importance samples per image for nll_is (default 1000, the literature's; 0 skips it; "
                        "time grows with K: 1 to 4 minutes for MNIST's 10,000 images on two CPU cores)")
    e.add_argument("--binarize", action=argparse.BooleanOptionalAction, default=None,
                   help="score the fixed, seeded binarization of the test split (pixels 0/255 drawn with "
                        "probability pixel/255), the density-estimation setting (default: as the model was "
                        "trained)")
    e.add_argument("--json", action="store_true", help="print one JSON line instead of text")

    ip = commands.add_parser("interpolate", help="decode the line between two images",
                             description="Encode two images to their posterior means and decode evenly spaced "
                             "points on the straight line between them, both ends included. The pictures are "
                             "prepared as predict does (converted, inverted when dark ink is on light paper, "
                             "centred). Writes one PNG strip: image A, the --steps decoded images, image B.")
    ip.add_argument("image_a", type=Path, metavar="A", help="the first image (PNG, JPEG, anything Pillow reads)")
    ip.add_argument("image_b", type=Path, metavar="B", help="the second image")
    ip.add_argument("--steps", type=positive_int, default=10, help="decoded images, ends included (default 10)")
    model_flags(ip)
    picture_flags(ip, "the pictures")
    png_flags(ip, 4, "interpolation_A_B.png")

    tv = commands.add_parser("traverse", help="sweep latent dimensions one at a time",
                             description="Show what each latent dimension encodes: one row per dimension in "
                             "--dims, that coordinate swept evenly over [-SPAN, SPAN] (three prior standard "
                             "deviations by default) while the others stay at 0, the prior's mean, or at the "
                             "posterior mean of --base. Writes one PNG grid.")
    tv.add_argument("--dims", type=dimensions, metavar="D[,D...]",
                    help="latent dimensions, counted from 0 (default: the first 10, or all if fewer)")
    tv.add_argument("--steps", type=positive_int, default=11, help="images per row (default 11: the middle one "
                    "is the base point)")
    tv.add_argument("--span", type=positive_float, default=3.0, help="sweep from -SPAN to SPAN (default 3)")
    tv.add_argument("--base", type=Path, metavar="IMG", help="hold the other dimensions at this image's "
                    "posterior mean instead of 0")
    model_flags(tv)
    png_flags(tv, 3, "traversal.png")

    pl = commands.add_parser("plot", help="plot a run: loss curves and the latent space",
                             description="Write plots of a training run (needs matplotlib): loss_curves.png, "
                             "the train and validation negative ELBO, reconstruction MSE and KL per epoch from "
                             "RUN/metrics.jsonl; when RUN/model.npz exists and the test split has labels, "
                             "latent_scatter.png, its posterior means coloured by label (the two coordinates "
                             "for a 2-D latent space, else the first two principal components); and for a 2-D "
                             "latent space manifold.png, images decoded over a grid of z evenly spaced in "
                             "probability (Kingma & Welling, figure 4).")
    pl.add_argument("run", type=Path, metavar="RUN", help="the run directory written by train (its --out)")
    backend_flag(pl)
    data_flags(pl, None)
    pl.add_argument("--curves-only", action="store_true", help="write only loss_curves.png, loading neither "
                    "the model nor the data")
    pl.add_argument("--out", type=Path, metavar="DIR", help="where to write (default: RUN itself)")

    commands.add_parser("info", help="versions, usable backends, threading, GPU",
                        description="Print versions, which backends work on this machine, Numba's threading "
                        "layer and the GPU if any.")

    from vaecore.benchmark.configs import CONFIGS

    b = commands.add_parser("bench", help="time the training step against PyTorch and JAX",
                            description="Time one full training step (forward, backward, Adam; float32) of the "
                            "benchmark configurations with vaecore, with the same network in PyTorch (eager, "
                            "torch.optim.Adam) and in JAX (one jax.jit step including Adam) when they are installed, "
                            "and with the step's matmuls alone (np.matmul on the step's own shapes: this machine's "
                            "matmul ceiling). Prints the CPU, cores and the BLAS kernel NumPy runs, then per "
                            "configuration: steps per second of each, ours over the faster reference (with the "
                            "target), and the share of the matmul ceiling ours reaches. Implementations are timed in "
                            "interleaved rounds and medians are shown; keep the machine otherwise idle. PyTorch and "
                            "JAX are optional and never vaecore dependencies: pip install torch==2.13.0 / pip install "
                            "jax. On machines that set OPENBLAS_CORETYPE, run it as "
                            "'env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python cli.py bench'. The full suite "
                            "with pytest-benchmark: pytest benchmarks/test_step_bench.py --benchmark-only.",
                            epilog="configurations (input-hidden-latent, batch): " + "; ".join(
                                f"{c.name}: {c.describe()}" for c in CONFIGS.values()))
    b.add_argument("--configs", type=bench_configs, default=tuple(CONFIGS), metavar="NAME[,NAME...]",
                   help=f"configurations to time, comma-separated (default: all: {','.join(CONFIGS)})")
    b.add_argument("--seconds", type=positive_float, default=2.0, metavar="S",
                   help="timed seconds per implementation and configuration (default 2; the whole run takes "
                        "about 5 S + 4 seconds per configuration); longer gives steadier medians")
    b.add_argument("--backend", choices=BACKENDS, default="numpy",
                   help="where our step runs: numpy (CPU; default, the claim is about the CPU), cupy (NVIDIA GPU, "
                        "against PyTorch and JAX on the same GPU and cuBLAS's matmul rate) or auto (CuPy when a GPU "
                        "answers, else NumPy)")

    d = commands.add_parser("data", help="fetch or inspect data sets", description="Fetch or inspect data sets.")
    data_commands = d.add_subparsers(dest="data_command", required=True, metavar="ACTION", parser_class=OneLineParser)
    f = data_commands.add_parser("fetch", help="download a named data set into the cache",
                                 description="Download mnist or fashion-mnist into the cache ($VAECORE_DATA, "
                                 "else ~/.cache/vaecore), verifying checksums.")
    f.add_argument("name", choices=("mnist", "fashion-mnist"))
    i = data_commands.add_parser("info", help="describe a data source", description="Load a data source and "
                                 "describe it: origin, shapes, labels, pixel statistics.")
    i.add_argument("source", help="mnist, fashion-mnist, an IDX folder, an image folder or an .npz")
    i.add_argument("--image-size", type=positive_int, default=28, metavar="PX", help="for image folders (default 28)")
    i.add_argument("--channels", type=int, choices=(1, 3), default=1, help="for image folders (default 1)")
    return parser


def log(message):
    print(message, flush=True)


def progress_bar(desc, unit):
    """A tqdm bar as a callable ``(done, total, loss=None)`` when stderr is a terminal; None otherwise."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    bar = tqdm(desc=desc, unit=unit, leave=False, dynamic_ncols=True)

    def update(done, total, loss=None):
        bar.total = total
        bar.update(done - bar.n)
        if loss is not None and (done % 20 == 0 or done == total):
            bar.set_postfix(loss=f"{loss:.1f}", refresh=False)
        if done >= total:
            bar.close()
    return update


def progress_bars():
    """A factory of one bar per epoch for ``run_training``, or None when stderr is not a terminal."""
    return (lambda epoch: progress_bar(f"epoch {epoch}", "step")) if sys.stderr.isatty() else None


def require_image_shape(model_config, dataset, what="the model"):
    from vaecore.errors import VaecoreError

    if tuple(model_config.image_shape) != tuple(dataset.image_shape):
        raise VaecoreError(f"{what} takes images of shape {tuple(model_config.image_shape)}, the data has "
                           f"{tuple(dataset.image_shape)}")


class StopOnSignal:
    """Turns the first SIGINT or SIGTERM into a request to stop after the current step.

    Training polls the instance between steps, saves the last completed step and exits with
    128 + the signal's number; a second Ctrl-C stops at once.
    """

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __call__(self):
        return self.signum

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step (Ctrl-C again to quit at once)",
              file=sys.stderr, flush=True)

    def __enter__(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        return False


def log_to_stderr(message):
    print(message, file=sys.stderr, flush=True)


def load_data(args, source, seed=0, log=log, image_shape=None):
    """The data set ``source``; image folders are read at ``image_shape`` (C, H, W) when a model
    already fixes it, else at the --image-size and --channels flags."""
    from vaecore.data import load_dataset

    channels, image_size = (image_shape[0], image_shape[1]) if image_shape else (args.channels, args.image_size)
    return load_dataset(source, seed=seed, image_size=image_size, channels=channels,
                        skip_bad=getattr(args, "skip_bad", False), log=log)


def cmd_train(args):
    from vaecore import checkpoint
    from vaecore.backend import make_backend
    from vaecore.config import PRESETS, ModelConfig, TrainConfig
    from vaecore.errors import VaecoreError
    from vaecore.train import RunPaths, run_training

    model_flags = {"hidden": args.hidden, "latent_dim": args.latent_dim, "likelihood": args.likelihood,
                   "gaussian_std": args.gaussian_std, "activation": args.activation}
    train_flags = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
                   "limit": args.limit, "clip_grad": args.clip_grad, "weight_decay": args.weight_decay,
                   "beta": args.beta, "kl_warmup": args.kl_warmup, "iw_samples": args.iw_samples,
                   "binarize": args.binarize}
    given = {k: v for k, v in {**model_flags, **train_flags}.items() if v is not None}
    if args.resume:
        changed = sorted(set(given) - {"epochs"})
        if changed:
            raise VaecoreError(f"--resume continues a run with its own settings; drop --{changed[0].replace('_', '-')}")
        ckpt = checkpoint.load(RunPaths(args.out).checkpoint)
        model_config, train_config = ckpt.model_config, ckpt.train_config
        if args.epochs is not None:
            train_config = replace(train_config, epochs=args.epochs)
        source = train_config.data
    else:
        preset_model, preset_train = PRESETS[args.preset]
        train_config = TrainConfig(data=args.data, **{**preset_train, **{k: v for k, v in train_flags.items() if v is not None}})
        model_config = None
        source = args.data
    train_config.validate()
    backend = make_backend(args.backend, seed=train_config.seed, log=log)
    if not args.resume and RunPaths(args.out).checkpoint.exists() and not args.overwrite:
        raise VaecoreError(f"{RunPaths(args.out).checkpoint} already exists; continue it with --resume, "
                           f"replace it with --overwrite, or choose another --out")
    dataset = load_data(args, source, seed=train_config.seed, image_shape=model_config and model_config.image_shape)
    if train_config.limit:
        dataset = dataset.take(train_config.limit)
    if model_config is None:
        model_config = ModelConfig(image_shape=dataset.image_shape,
                                   **{**preset_model, **{k: v for k, v in model_flags.items() if v is not None}})
    model_config.validate()
    require_image_shape(model_config, dataset, "the checkpoint's model")
    log(f"data: {dataset.name}, {len(dataset.x_train)} train / {len(dataset.x_test)} validation images "
        f"of {'x'.join(map(str, dataset.image_shape))}")
    variants = [f"IWAE bound with K={train_config.iw_samples}" if train_config.iw_samples > 1 else "",
                f"beta {train_config.beta:g}" if train_config.beta != 1 else "",
                f"KL warm-up over {train_config.kl_warmup} epochs" if train_config.kl_warmup else "",
                "binarized" if train_config.binarize else ""]
    log(f"model: {model_config.input_dim}-{'-'.join(map(str, model_config.hidden))}-{model_config.latent_dim}, "
        f"{model_config.likelihood}, {model_config.activation}"
        f"{''.join(', ' + v for v in variants if v)}; Adam lr {train_config.lr:g}, batch "
        f"{train_config.batch_size}, {train_config.epochs} epoch{'s' if train_config.epochs != 1 else ''}; "
        f"backend {backend.describe()}")
    with StopOnSignal() as stop:
        run_training(args.out, model_config, train_config, backend, dataset, resume=args.resume, log=log,
                     progress_factory=progress_bars(), stop=stop)
    paths = RunPaths(args.out)
    log(f"wrote {paths.checkpoint}, {paths.metrics} and pictures in {args.out}/")


def cmd_predict(args):
    import numpy as np

    from vaecore import images, inference
    from vaecore.backend import make_backend
    from vaecore.train import load_model

    backend = make_backend(args.backend, log=log)
    model, _ = load_model(args.checkpoint, backend)
    shape = model.config.image_shape
    originals = np.stack([images.read_image(path, shape, invert=args.invert, fit=args.fit) for path in args.images])
    recons = inference.reconstruct(model, originals)
    out_dir = args.out or args.checkpoint.parent / "predictions"
    for path, original, recon in zip(args.images, originals, recons):
        target = out_dir / f"{path.stem}_reconstruction.png"
        images.save_png(images.grid(np.stack([original, recon]), ncols=2, scale=args.scale), target)
        log(f"{target}  mse {inference.mse(original, recon):.5f}")


def cmd_sample(args):
    from vaecore import images, inference
    from vaecore.backend import make_backend
    from vaecore.train import load_model

    backend = make_backend(args.backend, log=log)
    model, _ = load_model(args.checkpoint, backend)
    pictures = inference.sample(model, args.n, seed=args.seed)
    target = args.out or args.checkpoint.parent / "samples.png"
    images.save_png(images.grid(pictures, ncols=int(round(args.n ** 0.5)) or 1, scale=args.scale), target)
    log(f"wrote {args.n} samples to {target}")


def cmd_evaluate(args):
    from vaecore.backend import make_backend
    from vaecore.evaluation import evaluate_all
    from vaecore.train import load_model

    say = log_to_stderr if args.json else log        # stdout carries the JSON line alone
    backend = make_backend(args.backend, log=say)
    model, ckpt = load_model(args.checkpoint, backend)
    dataset = load_data(args, args.data or ckpt.train_config.data, seed=ckpt.train_config.seed, log=say,
                        image_shape=model.config.image_shape)
    require_image_shape(model.config, dataset)
    binarize = ckpt.train_config.binarize if args.binarize is None else args.binarize
    result = evaluate_all(model, dataset.x_test, seed=args.seed, iw_samples=args.iw_samples, binarize=binarize,
                          progress=progress_bar("importance sampling", "image"))
    if args.json:
        print(json.dumps(result))
        return
    line = (f"{dataset.name} test split{' (binarized)' if binarize else ''}, {result['n']} images: negative ELBO "
            f"{result['test_loss']:.2f} nats, reconstruction MSE {result['recon_mse']:.5f}, KL {result['kl']:.2f}, "
            f"active units {result['active_units']}/{model.config.latent_dim}")
    if result["nll_is"] is not None:
        line += f", -log p(x) ~ {result['nll_is']:.2f} nats (importance-sampled upper bound, K={result['iw_samples']})"
    log(line)


def cmd_interpolate(args):
    import numpy as np

    from vaecore import images
    from vaecore.backend import make_backend
    from vaecore.latent_pictures import interpolation_strip
    from vaecore.train import load_model

    backend = make_backend(args.backend, log=log)
    model, _ = load_model(args.checkpoint, backend)
    shape = model.config.image_shape
    a, b = (images.read_image(path, shape, invert=args.invert, fit=args.fit) for path in (args.image_a, args.image_b))
    strip = interpolation_strip(model, a, b, args.steps)
    target = args.out or args.checkpoint.parent / f"interpolation_{args.image_a.stem}_{args.image_b.stem}.png"
    images.save_png(images.grid(np.concatenate([a[None], strip, b[None]]), ncols=args.steps + 2,
                                scale=args.scale), target)
    log(f"wrote {target}: {args.image_a.name}, {args.steps} decoded steps, {args.image_b.name}")


def cmd_traverse(args):
    from vaecore import images
    from vaecore.backend import make_backend
    from vaecore.inference import posterior_means
    from vaecore.latent_pictures import traversal_grid
    from vaecore.train import load_model

    backend = make_backend(args.backend, log=log)
    model, _ = load_model(args.checkpoint, backend)
    dims = args.dims or tuple(range(min(10, model.config.latent_dim)))
    base = None
    if args.base is not None:
        base = posterior_means(model, images.read_image(args.base, model.config.image_shape)[None])[0]
    grid = traversal_grid(model, dims, steps=args.steps, span=args.span, base=base)
    target = args.out or args.checkpoint.parent / "traversal.png"
    images.save_png(images.grid(grid, ncols=args.steps, scale=args.scale), target)
    log(f"wrote {target}: rows are latent dimensions {','.join(map(str, dims))}, each swept over "
        f"[{-args.span:g}, {args.span:g}]")


def cmd_plot(args):
    from vaecore.backend import make_backend
    from vaecore.plots import plot_run, read_metrics
    from vaecore.train import RunPaths, load_model

    paths = RunPaths(args.run)
    read_metrics(paths.metrics)                      # fail before loading anything else
    model = dataset = None
    if not args.curves_only and paths.checkpoint.exists():
        backend = make_backend(args.backend, log=log)
        model, ckpt = load_model(paths.checkpoint, backend)
        dataset = load_data(args, args.data or ckpt.train_config.data, seed=ckpt.train_config.seed,
                            image_shape=model.config.image_shape)
        require_image_shape(model.config, dataset)
    for path in plot_run(args.run, model=model, dataset=dataset, out_dir=args.out, log=log):
        log(f"wrote {path}")


def cmd_info(args):
    import numba
    import numpy

    from vaecore import __version__
    from vaecore.backend import cupy_status

    log(f"vaecore {__version__}, Python {platform.python_version()} on {platform.machine()} {platform.system()}")
    log(f"numpy {numpy.__version__}, numba {numba.__version__}")
    try:
        import PIL
        log(f"pillow {PIL.__version__}")
    except ImportError:
        pass
    log("backend numpy: available")
    usable, reason = cupy_status()
    if usable:
        import cupy
        props = cupy.cuda.runtime.getDeviceProperties(0)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        log(f"backend cupy: available (cupy {cupy.__version__}, GPU 0: {name}, "
            f"{props['totalGlobalMem'] / 2**30:.1f} GiB)")
    else:
        log(f"backend cupy: unavailable ({reason})")
    log(f"numba threading layer: {threading_layer()}, {numba.config.NUMBA_NUM_THREADS} threads")
    try:
        from threadpoolctl import threadpool_info
        for pool in threadpool_info():
            library = Path(pool.get("filepath", "")).name
            if pool.get("user_api") == "blas":
                log(f"BLAS: {pool.get('internal_api')} {pool.get('version')} ({pool.get('architecture')} kernels), "
                    f"{pool.get('num_threads')} threads, {library}")
            else:
                log(f"{pool.get('user_api')}: {pool.get('internal_api')}, {pool.get('num_threads')} threads, {library}")
    except ImportError:
        pass
    if os.environ.get("OPENBLAS_CORETYPE"):
        log(f"note: OPENBLAS_CORETYPE={os.environ['OPENBLAS_CORETYPE']} is set, so OpenBLAS uses those kernels "
            f"rather than the best ones for this CPU")


def threading_layer():
    """The layer Numba actually picks, which is known only after a parallel function has run."""
    import numba
    import numpy

    @numba.njit(parallel=True, cache=False)
    def touch(a):
        for i in numba.prange(a.size):
            a[i] += 1.0

    try:
        touch(numpy.zeros(4))
        return numba.threading_layer()
    except Exception as e:  # no threading layer installed is a fact to report, not a crash
        return f"unavailable ({e})"


def cmd_bench(args):
    from vaecore.benchmark.report import run_bench

    run_bench(args.configs, seconds=args.seconds, backend=args.backend, log=log)


def cmd_data(args):
    from vaecore.data import describe, fetch, load_dataset

    if args.data_command == "fetch":
        dataset = fetch(args.name, log=log)
        log(f"{dataset.name}: {len(dataset.x_train)} train / {len(dataset.x_test)} test images ({dataset.origin})")
    else:
        dataset = load_dataset(args.source, image_size=args.image_size, channels=args.channels, log=log)
        log(describe(dataset))


COMMANDS = {"train": cmd_train, "predict": cmd_predict, "sample": cmd_sample, "evaluate": cmd_evaluate,
            "interpolate": cmd_interpolate, "traverse": cmd_traverse, "plot": cmd_plot, "info": cmd_info,
            "bench": cmd_bench, "data": cmd_data}


def _warning_line(message, category, filename, lineno, file=None, line=None):
    """A warning shown as the errors are: one line on stderr, without the source line that raised it
    (a GPU step that could not be recorded as a CUDA graph, say)."""
    print(f"warning: {message}", file=sys.stderr if file is None else file)


def main(argv=None):
    from vaecore.errors import VaecoreError

    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _warning_line
            COMMANDS[args.command](args)
    except VaecoreError as e:
        code = getattr(e, "exit_code", 1)
        print(str(e) if code > 128 else f"error: {e}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
