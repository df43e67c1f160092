"""The vaecore command line: ``python cli.py COMMAND`` (or ``vaecore COMMAND`` once installed).

This file only parses flags, builds the backend and the configs, calls into ``vaecore`` and prints
what happened. Problems the user can fix arrive as ``VaecoreError`` and become one line on stderr
with a non-zero exit; anything else is a bug and keeps its traceback.
"""

import argparse
import json
import platform
import signal
import sys
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
        p.add_argument("--image-size", type=positive_int, default=28, metavar="PX",
                       help="side length image folders are resized to (default 28)")
        p.add_argument("--channels", type=int, choices=(1, 3), default=1,
                       help="1 for grayscale (default) or 3 for RGB, for image folders")
        p.add_argument("--skip-bad", action="store_true", help="skip unreadable images in an image folder "
                       "instead of stopping")

    def checkpoint_flag(p):
        p.add_argument("--checkpoint", type=Path, default=DEFAULT_RUN / "model.npz", metavar="PATH",
                       help=f"the trained model (default {DEFAULT_RUN / 'model.npz'})")

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
    checkpoint_flag(p)
    backend_flag(p)
    p.add_argument("--invert", choices=INVERT_CHOICES, default="auto",
                   help="invert the picture: auto (when its border is light; default), yes or no")
    p.add_argument("--fit", choices=FIT_CHOICES, default="center",
                   help="center: crop to the drawing and centre it with a margin as MNIST was made "
                        "(default); stretch: resize the whole picture")
    p.add_argument("--scale", type=positive_int, default=8, help="enlargement of the output picture (default 8)")
    p.add_argument("--out", type=Path, metavar="DIR", help="where to write (default: predictions/ beside the checkpoint)")

    s = commands.add_parser("sample", help="draw images from the prior",
                            description="Decode z ~ N(0, I) into a grid of images.")
    checkpoint_flag(s)
    backend_flag(s)
    s.add_argument("--n", type=positive_int, default=64, help="number of samples (default 64)")
    s.add_argument("--seed", type=int, default=0, help="seed for z (default 0)")
    s.add_argument("--scale", type=positive_int, default=3, help="enlargement of the output picture (default 3)")
    s.add_argument("--out", type=Path, metavar="PNG", help="output file (default: samples.png beside the checkpoint)")

    e = commands.add_parser("evaluate", help="score a model on the test split",
                            description="Negative ELBO (nats per image, one z sample per image), "
                            "posterior-mean reconstruction MSE and KL on the test split.")
    checkpoint_flag(e)
    backend_flag(e)
    data_flags(e, None)
    e.add_argument("--seed", type=int, default=0, help="seed for the z samples (default 0)")
    e.add_argument("--json", action="store_true", help="print one JSON line instead of text")

    commands.add_parser("info", help="versions, usable backends, threading, GPU",
                        description="Print versions, which backends work on this machine, Numba's threading "
                        "layer and the GPU if any.")

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


def progress_bars():
    """A tqdm bar per epoch when stderr is a terminal; None (no bar) otherwise."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    def factory(epoch):
        bar = tqdm(desc=f"epoch {epoch}", unit="step", leave=False, dynamic_ncols=True)

        def update(step, steps, loss):
            bar.total = steps
            bar.update(step - bar.n)
            if step % 20 == 0 or step == steps:
                bar.set_postfix(loss=f"{loss:.1f}", refresh=False)
            if step == steps:
                bar.close()
        return update
    return factory


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


def load_data(args, source, seed=0):
    from vaecore.data import load_dataset

    return load_dataset(source, seed=seed, image_size=args.image_size, channels=args.channels,
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
                   "limit": args.limit, "clip_grad": args.clip_grad, "weight_decay": args.weight_decay}
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
        if RunPaths(args.out).checkpoint.exists() and not args.overwrite:
            raise VaecoreError(f"{RunPaths(args.out).checkpoint} already exists; continue it with --resume, "
                               f"replace it with --overwrite, or choose another --out")
        preset_model, preset_train = PRESETS[args.preset]
        train_config = TrainConfig(data=args.data, **{**preset_train, **{k: v for k, v in train_flags.items() if v is not None}})
        model_config = None
        source = args.data
    train_config.validate()
    backend = make_backend(args.backend, seed=train_config.seed, log=log)
    dataset = load_data(args, source, seed=train_config.seed)
    if train_config.limit:
        dataset = dataset.take(train_config.limit)
    if model_config is None:
        model_config = ModelConfig(image_shape=dataset.image_shape,
                                   **{**preset_model, **{k: v for k, v in model_flags.items() if v is not None}})
    model_config.validate()
    if tuple(model_config.image_shape) != tuple(dataset.image_shape):
        raise VaecoreError(f"the checkpoint's model takes images of shape {model_config.image_shape}, "
                           f"the data has {dataset.image_shape}")
    log(f"data: {dataset.name}, {len(dataset.x_train)} train / {len(dataset.x_test)} validation images "
        f"of {'x'.join(map(str, dataset.image_shape))}")
    log(f"model: {model_config.input_dim}-{'-'.join(map(str, model_config.hidden))}-{model_config.latent_dim}, "
        f"{model_config.likelihood}, {model_config.activation}; Adam lr {train_config.lr:g}, batch "
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
    from vaecore.config import TrainConfig
    from vaecore.optim import Adam
    from vaecore.train import Trainer, load_model

    backend = make_backend(args.backend, log=log if not args.json else None)
    model, ckpt = load_model(args.checkpoint, backend)
    dataset = load_data(args, args.data or ckpt.train_config.data, seed=ckpt.train_config.seed)
    trainer = Trainer(model, Adam(backend, 1), TrainConfig(batch_size=1), dataset.x_test[:1], dataset.x_test)
    result = trainer.evaluate(trainer.x_val, seed=args.seed)
    result = {"test_loss": result["val_loss"], "recon_mse": result["recon_mse"], "kl": result["kl"],
              "n": len(dataset.x_test)}
    if args.json:
        print(json.dumps(result))
    else:
        log(f"{dataset.name} test split, {result['n']} images: negative ELBO {result['test_loss']:.2f} nats, "
            f"reconstruction MSE {result['recon_mse']:.5f}, KL {result['kl']:.2f}")


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
            log(f"BLAS: {pool.get('internal_api')} {pool.get('version')} ({pool.get('architecture')}), "
                f"{pool.get('num_threads')} threads")
    except ImportError:
        pass


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


def cmd_data(args):
    from vaecore.data import describe, fetch, load_dataset

    if args.data_command == "fetch":
        dataset = fetch(args.name, log=log)
        log(f"{dataset.name}: {len(dataset.x_train)} train / {len(dataset.x_test)} test images ({dataset.origin})")
    else:
        dataset = load_dataset(args.source, image_size=args.image_size, channels=args.channels, log=log)
        log(describe(dataset))


COMMANDS = {"train": cmd_train, "predict": cmd_predict, "sample": cmd_sample, "evaluate": cmd_evaluate,
            "info": cmd_info, "data": cmd_data}


def main(argv=None):
    from vaecore.errors import VaecoreError

    args = build_parser().parse_args(argv)
    try:
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
