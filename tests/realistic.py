"""ImageNet-shaped trees whose files look like real ImageNet's, built in a few seconds from code.

Real ImageNet folders are not uniform: JPEGs from ~50 to 500 px a side at any aspect, greyscale and CMYK
JPEGs, a PNG under a .JPEG name, EXIF-rotated photos, upper- and lower-case extensions, and the odd truncated
or empty file. Code that decodes at plan time, takes channels from the first file or dies on one bad JPEG
passes on uniform fakes and fails here (issue 15).

Every file is one of `KINDS`, in a fixed cycle, at one of `SIZES` (another cycle), so any folder of at least
`len(KINDS)` images holds every kind. Content is a smooth gradient and a shape in a class-dependent colour (a
classifier could learn it), fixed by (class, index, seed). Encoded bytes are cached in-process (ImageNet-100
train reuses ImageNet train's, as the real subset does; a second tree reuses the first's), so a whole data
root (~500 files) builds in a few seconds.

Layouts are those of genrobust's eval-set registry (README, "Evaluation data"):
    imagenet100/train/<wnid>/, imagenet/train/<wnid>/, imagenet/val/<wnid>/,
    imagenetv2-matched-frequency-format-val/<k>/ (k = ImageNet class index),
    imagenet-sketch/sketch/<wnid>/, imagenet-r/<wnid>/, imagenet-a/<wnid>/ (their 200-class subsets),
    objectnet-1.0/images/<objectnet folder>/ (a red frame, 2 pixels so JPEG chroma subsampling keeps it red,
        all of which the registry's 2-pixel border crop removes),
    retrieval/imagenet100/<wnid>/, retrieval/imagenet1k/<wnid>/, models/ (tiny random SD pipelines).
"""
import colorsys
import functools
import io
import pathlib
from dataclasses import dataclass, field

import numpy as np

# (kind, PIL mode as saved, format, file suffix). The order is the cycle every folder follows.
KINDS = (
    ("l-jpeg", "L", "JPEG", ".JPEG"),  # first: a folder's first file is greyscale, as in the issue
    ("rgb-jpeg", "RGB", "JPEG", ".JPEG"),
    ("cmyk-jpeg", "CMYK", "JPEG", ".jpg"),
    ("rgba-png", "RGBA", "PNG", ".png"),
    ("p-png", "P", "PNG", ".PNG"),
    ("png-as-jpeg", "RGB", "PNG", ".JPEG"),  # ImageNet's n02105855_2933.JPEG is a PNG
    ("exif6-jpeg", "RGB", "JPEG", ".jpeg"),  # EXIF Orientation 6: stored w x h, shown rotated
    ("rgb-jpeg-lower", "RGB", "JPEG", ".jpg"),
    ("exif8-jpeg", "RGB", "JPEG", ".JPEG"),  # EXIF Orientation 8
)
KIND_NAMES = tuple(k[0] for k in KINDS)
# (width, height): 50 to 500 px a side, aspect 1:3 to 3:1 (ten sizes: a cycle prime to len(KINDS)).
SIZES = ((500, 375), (60, 180), (333, 500), (180, 60), (50, 50), (420, 140), (150, 450), (256, 256),
         (375, 500), (91, 123))
CORRUPT_KINDS = ("truncated-jpeg", "zero-byte")
ORIENTATION = 0x0112


def _reference(name):
    from genrobust.evaluate import reference
    return reference(name)


@functools.lru_cache(maxsize=None)
def subsets():
    """The reference class lists: IN-100 wnids, ImageNet-R and -A wnid sets, wnid -> ObjectNet folder,
    wnid -> ImageNet-V2 folder (its class index, as a string), all 1,000 wnids."""
    on = {w: c["objectnet_folder"] for c in _reference("objectnet_to_imagenet.json")["classes"]
          for w in c["imagenet_wnids"]}
    v2 = {w: str(k) for k, w in enumerate(_reference("imagenet_v2_folder_order.json")["folder_to_wnid"])}
    return {"in100": tuple(_reference("imagenet100_wnids.json")["wnids"]),
            "r": frozenset(_reference("imagenet_r_wnids.json")["wnids"]),
            "a": frozenset(_reference("imagenet_a_wnids.json")["wnids"]),
            "objectnet": on, "v2": v2,
            "in1k": tuple(c["wnid"] for c in _reference("imagenet_classes.json")["classes"])}


@functools.lru_cache(maxsize=None)
def _priority():
    """IN-100 wnids, the six that cover every shift's class subset first (see `imagenet100_classes`)."""
    s = subsets()
    r, a, on = s["r"], s["a"], s["objectnet"]
    tests = (lambda w: w in r and w in a and w not in on, lambda w: w in r and w not in a and w not in on,
             lambda w: w in a and w not in r and w not in on, lambda w: w in on and w not in a and w not in r,
             lambda w: w in on and w in a, lambda w: w not in r and w not in a and w not in on)
    picked = []
    for test in tests:
        picked.append(next(w for w in s["in100"] if test(w) and w not in picked))
    return tuple(picked + [w for w in s["in100"] if w not in picked])


def imagenet100_classes(n=6):
    """`n` sorted ImageNet-100 wnids that cover every shift's class subset: the first six are one in ImageNet-R
    and -A, one in R only, one in A only, one mapped to ObjectNet, one in ObjectNet and A, one in none; then
    more IN-100 wnids in their list order."""
    picked = _priority()
    if not 2 <= n <= len(picked):
        raise ValueError(f"n must be in 2..{len(picked)}, got {n}")
    return sorted(picked[:n])


def class_colour(wnid):
    """An RGB colour fixed by the wnid: the default six 60 degrees of hue apart, others by the golden ratio."""
    order, in1k = _priority(), subsets()["in1k"]
    k = order.index(wnid) if wnid in order else len(order) + (in1k.index(wnid) if wnid in in1k else 0)
    hue = k / 6 if k < 6 else (k * 0.618034) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 0.9)
    return np.array([r, g, b]) * 255


def _pixels(wnid, index, seed, size):
    """A smooth gradient in the class colour with a lighter ellipse, `size` = (w, h), uint8 H x W x 3."""
    from PIL import Image, ImageDraw

    w, h = size
    rng = np.random.default_rng([seed, index, *map(ord, wnid)])
    colour = class_colour(wnid)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = (np.cos(angle) * xx / w + np.sin(angle) * yy / h + 1) / 2  # 0..1 across the image
    shade = 0.6 + 0.4 * t[..., None]
    arr = np.clip(colour * shade + rng.normal(0, 4, (1, 1, 3)), 0, 255).astype(np.uint8)
    im = Image.fromarray(arr)
    cx, cy, rx, ry = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h, rng.uniform(0.1, 0.3) * w, \
        rng.uniform(0.1, 0.3) * h
    light = tuple(int(v) for v in np.clip(255 - (255 - colour) * 0.3, 0, 255))
    ImageDraw.Draw(im).ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=light)
    return np.asarray(im)


@functools.lru_cache(maxsize=4096)
def encode(wnid, index, seed=0, border=0):
    """(bytes, kind, suffix, stored (w, h)) of image `index` of class `wnid`: kind and size by the cycles."""
    from PIL import Image

    kind, mode, fmt, suffix = KINDS[index % len(KINDS)]
    w, h = SIZES[index % len(SIZES)]
    arr = _pixels(wnid, index, seed, (w, h))
    if border:  # ObjectNet's frame: `border` pixels of pure red around the photo
        arr = arr.copy()
        arr[:border], arr[-border:], arr[:, :border], arr[:, -border:] = (255, 0, 0), (255, 0, 0), (255, 0, 0), \
            (255, 0, 0)
    im = Image.fromarray(arr)
    if mode == "RGBA":
        alpha = np.linspace(128, 255, w, dtype=np.uint8)[None].repeat(h, 0)
        im.putalpha(Image.fromarray(alpha))
    elif mode == "P":
        im = im.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    elif mode != "RGB":
        im = im.convert(mode)
    buf = io.BytesIO()
    if fmt == "JPEG":
        kwargs = {"quality": 90}
        if kind.startswith("exif"):
            exif = Image.Exif()
            exif[ORIENTATION] = int(kind[4])
            kwargs["exif"] = exif
        im.save(buf, format="JPEG", **kwargs)
    else:
        im.save(buf, format="PNG")
    return buf.getvalue(), kind, suffix, (w, h)


@functools.lru_cache(maxsize=64)
def _truncated(wnid, index, seed):
    """The first half of a valid baseline RGB JPEG: the header reads, the data does not decode."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(_pixels(wnid, index, seed, (300, 200))).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    return data[:len(data) // 2]


@dataclass
class Tree:
    """What a builder wrote: every file with its kind and stored size, the corrupt files by kind."""

    root: pathlib.Path
    files: dict = field(default_factory=dict)  # path -> (kind, (w, h))
    corrupt: dict = field(default_factory=dict)  # path -> "truncated-jpeg" | "zero-byte"

    def update(self, other):
        self.files.update(other.files)
        self.corrupt.update(other.corrupt)
        return self

    def good(self, under=None):
        """Paths of decodable files (under a folder if given)."""
        return [p for p in self.files if under is None or pathlib.Path(under) in p.parents]


def _write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def class_folder(folder, wnid, n, seed=0, offset=0, border=0):
    """`n` images of class `wnid` in `folder` (created), named `<wnid>_<i><suffix>` as ImageNet's are."""
    folder = pathlib.Path(folder)
    tree = Tree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(offset, offset + n):
        data, kind, suffix, size = encode(wnid, i, seed, border)
        path = folder / f"{wnid}_{i}{suffix}"
        _write(path, data)
        tree.files[path] = (kind, size)
    return tree


def add_corrupt(folder, wnid, count, seed=0, start=0):
    """`count` corrupt files in `folder`, alternating a truncated JPEG and a zero-byte .JPEG."""
    folder = pathlib.Path(folder)
    tree = Tree(folder)
    for j in range(count):
        kind = CORRUPT_KINDS[(start + j) % 2]
        path = folder / f"{wnid}_corrupt{start + j}{'.JPEG' if kind == 'zero-byte' else '.jpg'}"
        _write(path, b"" if kind == "zero-byte" else _truncated(wnid, start + j, seed))
        tree.corrupt[path] = kind
    return tree


def imagefolder(root, classes=None, per_class=10, seed=0, offset=0, corrupt=0, folders=None, border=0):
    """An ImageFolder `<root>/<folder>/<wnid>_<i><suffix>`; returns its `Tree`.

    Args:
        classes: wnids (default `imagenet100_classes()`).
        folders: folder name per class (default the wnid; V2 uses class indices, ObjectNet its own names).
        corrupt: how many corrupt files (False/True = 0/1; truncated JPEGs and zero-byte files alternate),
            spread over the classes, on top of the `per_class` good images. Keep count <= 1% of the folder
            where a run must succeed under the default --max-corrupt (see `max_corrupt_ok`).
    """
    root = pathlib.Path(root)
    classes = list(classes or imagenet100_classes())
    folders = list(folders or classes)
    tree = Tree(root)
    for k, (w, f) in enumerate(zip(classes, folders)):  # staggered: small folders still mix every kind
        tree.update(class_folder(root / f, w, per_class, seed, offset + k * per_class, border))
    for j in range(int(corrupt)):
        k = j % len(classes)
        tree.update(add_corrupt(root / folders[k], classes[k], 1, seed, start=j))
    tree.root = root
    return tree


def max_corrupt_ok(n_good, corrupt, max_corrupt=0.01):
    """Whether `corrupt` bad files among `n_good` good ones stay within the --max-corrupt fraction."""
    return corrupt <= max_corrupt * (n_good + corrupt)


TRAIN_FOLDERS = ("imagenet100/train", "imagenet/train", "retrieval/imagenet100", "retrieval/imagenet1k")


def data_root(root, classes=None, train_per_class=17, eval_per_class=3, seed=0, corrupt=True, extra=True,
              eval_corrupt=0, retrieval_per_class=None):
    """$GENROBUST_DATA as the paper study configs and the eval-set registry expect it (no models).

    Args:
        classes: the training wnids (default `imagenet100_classes()`: six, covering R, A and ObjectNet).
        train_per_class: good images per class in each train and retrieval folder (17 x 6 = 102: one
            corrupt file stays under 1%).
        eval_per_class: images per class folder of each eval set.
        corrupt: True: one corrupt file in each train and retrieval folder (a truncated JPEG in the
            imagenet100 ones, a zero-byte file in the imagenet1k ones); False: none; an int: that many each.
        extra: also a class folder the model lacks in each eval set (as the real sets hold 200 or 1,000).
        eval_corrupt: corrupt files in each eval set's folder (0 by default: eval sets are small here).
        retrieval_per_class: good images per class in the retrieval folders (default train_per_class + 3:
            the retrieval control draws |real| images, up to one more per class than the real average).
    Returns the `Tree` of everything written.
    """
    root = pathlib.Path(root)
    s = subsets()
    classes = list(classes or imagenet100_classes())
    tree = Tree(root)
    n_corrupt = int(corrupt)
    for j, sub in enumerate(TRAIN_FOLDERS):
        # ImageNet-100 train is a subset of ImageNet train: the same images; retrieved ones are others
        retrieval = sub.startswith("retrieval")
        n = (train_per_class + 3 if retrieval_per_class is None else retrieval_per_class) if retrieval \
            else train_per_class
        t = imagefolder(root / sub, classes, n, seed=seed + retrieval, corrupt=0)
        for c in range(n_corrupt):  # truncated in the imagenet100 folders, zero-byte in the imagenet1k ones
            k = (c + j) % len(classes)
            t.update(add_corrupt(root / sub / classes[k], classes[k], 1, seed, start=c + (j % 2)))
        tree.update(t)
    lacking = next(w for w in s["in100"] if w not in classes and w in s["r"] and w in s["a"])
    evals = list(classes) + ([lacking] if extra else [])
    used = {s["objectnet"][w] for w in classes if w in s["objectnet"]}
    on_lacking = next(w for w, f in s["objectnet"].items() if f not in used)

    def eval_set(sub, wnids, folders=None, border=0, seed_offset=0):
        t = imagefolder(root / sub, wnids, eval_per_class, seed=seed, offset=10_000 + 100 * seed_offset,
                        corrupt=eval_corrupt, folders=folders, border=border)
        tree.update(t)

    eval_set("imagenet/val", evals)
    eval_set("imagenetv2-matched-frequency-format-val", evals, [s["v2"][w] for w in evals], seed_offset=5)
    eval_set("imagenet-sketch/sketch", evals, seed_offset=10)
    eval_set("imagenet-r", [w for w in evals if w in s["r"]], seed_offset=15)
    eval_set("imagenet-a", [w for w in evals if w in s["a"]], seed_offset=20)
    on = list({s["objectnet"][w]: w for w in [*classes, *([on_lacking] if extra else [])]
               if w in s["objectnet"]}.items())  # one folder per ObjectNet class
    eval_set("objectnet-1.0/images", [w for _, w in on], [f for f, _ in on], border=2, seed_offset=25)
    tree.root = root
    return tree


def models(root):
    """The tiny random-weight SD pipelines where the study configs expect local models: `root/models/...`."""
    import tiny_models

    root = pathlib.Path(root)
    tiny_models.tiny_sd(root / "models" / "stable-diffusion-v1-5")
    tiny_models.tiny_sd_variation(root / "models" / "sd-image-variations-diffusers")
    return root / "models"
