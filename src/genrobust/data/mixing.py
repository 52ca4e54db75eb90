"""Training-set assembly: real and generated images mixed class by class, seeded, with exact counts.

Modes (`MODES`):
- `add`: the real set plus round(k x |real|) generated images (k = `ratio`), spread evenly over the classes.
- `replace`: |real| images in all, round(f x |real|) of them generated (f = `fraction`). Every class keeps its
  real size; its generated images replace as many of its real ones, dropped at random by seed. The arm holds
  the number of images fixed and changes only where they come from.
- `generated-only`: every generated image, or `limit` of them spread evenly over the classes.

Several generated folders are pooled before drawing. Generated labels are aligned to the real class list by
class name, never by folder order. Small sets are read into memory as uint8 (`ImageSet`); ImageFolders too
large for that (or of mixed image sizes) stay on disk as a `FileSet`, which the trainer streams.
"""
import dataclasses
import logging
import pathlib

import torch

from .folder import align_classes
from .imageset import ImageSet, concat

logger = logging.getLogger(__name__)

MODES = ("add", "replace", "generated-only")
# Decoded uint8 bytes above which an ImageFolder is streamed from disk rather than held in memory.
MEMORY_LIMIT = 4 * 2**30
# Images (all folders together) above which "auto" streams from the listing alone, without reading a header:
# 1.28 M headers take minutes on a network file system, and 50,000 ImageNet-sized images would decode to
# ~7 GB, more than MEMORY_LIMIT anyway.
STREAM_ABOVE = 50_000


@dataclasses.dataclass
class FileSet:
    """Images on disk: paths, integer labels into `classes`, metadata columns; decoded while training.

    `channels` is what every image is converted to (1 = grayscale, 3 = RGB). Files are listed, not opened:
    the streaming decoder skips unreadable ones (naming them) up to `max_corrupt` of the set and raises beyond.
    """

    name: str
    files: list
    labels: torch.Tensor
    classes: list
    meta: dict = dataclasses.field(default_factory=dict)
    channels: int = 3
    max_corrupt: float = 0.01

    def __len__(self):
        return len(self.files)

    def subset(self, index, name=None):
        idx = torch.as_tensor(index, dtype=torch.long).tolist()
        return FileSet(name or self.name, [self.files[i] for i in idx], self.labels[idx].clone(),
                       list(self.classes), {k: [v[i] for i in idx] for k, v in self.meta.items()}, self.channels,
                       self.max_corrupt)

    def counts(self):
        counts = torch.bincount(self.labels, minlength=len(self.classes)).tolist()
        return dict(zip(self.classes, counts))


# --- exact per-class counts --------------------------------------------------------------------------

def balanced_counts(total, num_classes, generator):
    """Split `total` over classes as evenly as possible; the remainder goes to classes picked by seed."""
    base, rem = divmod(total, num_classes)
    counts = [base] * num_classes
    for c in torch.randperm(num_classes, generator=generator)[:rem].tolist():
        counts[c] += 1
    return counts


def proportional_counts(total, sizes, generator):
    """Split `total` over classes in proportion to `sizes`, in exact integers.

    Each class gets the floor of its share; the remainder goes one image at a time to the largest fractional
    parts, ties broken by seed. With equal sizes this is `balanced_counts` (the same draw, the same result).
    """
    n = sum(sizes)
    order = torch.randperm(len(sizes), generator=generator).tolist()
    if n == 0:
        return [0] * len(sizes)
    base = [total * s // n for s in sizes]  # integer arithmetic: no float rounding at any scale
    frac = [total * s % n for s in sizes]
    rank = {c: i for i, c in enumerate(order)}
    for c in sorted(range(len(sizes)), key=lambda c: (-frac[c], rank[c]))[:total - sum(base)]:
        base[c] += 1
    return base


def _check_enough(data, need, what):
    have = torch.bincount(data.labels, minlength=len(data.classes)).tolist()
    for c, n in enumerate(need):
        if n > have[c]:
            raise ValueError(f"{data.name} has {have[c]} images of class {data.classes[c]!r} but {what} needs {n}")


def _draw(labels, need, generator):
    """Per class c, `need[c]` indices of that class drawn without replacement; class by class."""
    picks = []
    for c, n in enumerate(need):
        idx = torch.nonzero(labels == c).flatten()
        picks.append(idx[torch.randperm(len(idx), generator=generator)[:n]])
    return torch.cat(picks) if picks else torch.zeros(0, dtype=torch.long)


# --- the three modes ---------------------------------------------------------------------------------

def _real_only(real, amount, flag):
    """The real set alone, when no generated image is asked for; an amount without folders is an error."""
    if amount > 0:
        raise ValueError(f"{flag} {amount} needs generated data; pass --generated FOLDER")
    return real, {"real": real.counts(), "generated": dict.fromkeys(real.classes, 0)}


def mix_add(real, generated, ratio, seed=0):
    """Real images plus round(ratio * |real|) generated ones, class-balanced, drawn without replacement.

    Args:
        real: the real ImageSet (or FileSet).
        generated: the same kind of set (several folders pooled), or None when ratio is 0.
        ratio: k >= 0.
    Returns (mixed set with an `origin` column, {"real": {class: n}, "generated": {class: n}}).
    """
    if ratio < 0:
        raise ValueError(f"--ratio must be >= 0 (k x |real| generated images are added), got {ratio}")
    real = _with_origin(real, "real")
    if ratio == 0 or generated is None:
        return _real_only(real, ratio, "--ratio")
    generated = _align(generated, real.classes)
    g = torch.Generator().manual_seed(seed)
    need = balanced_counts(round(ratio * len(real)), len(real.classes), g)
    _check_enough(generated, need, f"ratio {ratio}")
    chosen = _with_origin(generated.subset(_draw(generated.labels, need, g)), "generated")
    mixed = _concat([real, chosen], f"{real.name}+{generated.name}@{ratio}")
    return mixed, {"real": real.counts(), "generated": chosen.counts()}


def mix_replace(real, generated, fraction, seed=0):
    """|real| images in all, round(fraction * |real|) of them generated; every class keeps its real size.

    Per class, the generated count is the class's exact share of the total (`proportional_counts`: even
    when the real classes are); that many of its real images are dropped at random by seed, and as many
    generated ones drawn without replacement. Kept real images stay in their original order, first.
    Returns (mixed set with an `origin` column, {"real": kept, "generated": drawn} per class).
    """
    if not 0 <= fraction <= 1:
        raise ValueError(f"--fraction must be in [0, 1] (the generated share of |real| images), got {fraction}")
    real = _with_origin(real, "real")
    if fraction == 0 or generated is None:
        return _real_only(real, fraction, "--fraction")
    generated = _align(generated, real.classes)
    g = torch.Generator().manual_seed(seed)
    sizes = torch.bincount(real.labels, minlength=len(real.classes)).tolist()
    need = proportional_counts(round(fraction * len(real)), sizes, g)
    _check_enough(generated, need, f"fraction {fraction}")
    picks = _draw(generated.labels, need, g)
    keep = _draw(real.labels, [s - n for s, n in zip(sizes, need)], g).sort().values
    kept = real.subset(keep)
    chosen = _with_origin(generated.subset(picks), "generated")
    mixed = _concat([kept, chosen], f"{real.name}~{generated.name}@{fraction}")
    return mixed, {"real": kept.counts(), "generated": chosen.counts()}


def mix_generated_only(generated, limit=None, seed=0):
    """Every generated image, or `limit` of them spread evenly over the classes (drawn by seed).

    Every class needs at least one image: a class with none could never be learnt.
    Returns (set with an `origin` column, {"real": {class: 0}, "generated": {class: n}}).
    """
    if limit is not None:
        if limit < 1:
            raise ValueError(f"--limit must be >= 1, got {limit}")
        need = balanced_counts(limit, len(generated.classes), torch.Generator().manual_seed(seed))
        _check_enough(generated, need, f"--limit {limit}")
        generated = generated.subset(_draw(generated.labels, need, torch.Generator().manual_seed(seed)))
    empty = [c for c, n in generated.counts().items() if n == 0]
    if empty:
        raise ValueError(f"{generated.name} has no images of classes {empty}; a generated-only classifier "
                         "needs every class")
    chosen = _with_origin(generated, "generated")
    return chosen, {"real": dict.fromkeys(chosen.classes, 0), "generated": chosen.counts()}


# --- helpers shared by ImageSet and FileSet ----------------------------------------------------------

def _align(data, classes):
    if isinstance(data, ImageSet):
        return align_classes(data, classes)
    missing = [c for c in data.classes if c not in classes]
    if missing:
        raise ValueError(f"{data.name} has classes {missing} that the real data lacks; "
                         f"its classes must be a subset of {classes}")
    remap = torch.tensor([classes.index(c) for c in data.classes], dtype=torch.long)
    return dataclasses.replace(data, labels=remap[data.labels], classes=list(classes), meta=dict(data.meta))


def _with_origin(data, origin):
    return dataclasses.replace(data, meta={**data.meta, "origin": [origin] * len(data)})


def _concat(sets, name):
    if all(isinstance(s, ImageSet) for s in sets):
        return concat(sets, name)
    if not all(isinstance(s, FileSet) for s in sets):
        raise ValueError(f"{name}: cannot mix in-memory and streamed data")
    sets = [s for s in sets if len(s)]
    keys = sorted({k for s in sets for k in s.meta})
    return FileSet(name, [f for s in sets for f in s.files], torch.cat([s.labels for s in sets]),
                   list(sets[0].classes), {k: [x for s in sets for x in s.meta.get(k, [None] * len(s))]
                                           for k in keys}, sets[0].channels, sets[0].max_corrupt)


# --- reading folders, tolerating a few corrupt images ------------------------------------------------

def _listed(root, name, channels, max_corrupt):
    """A FileSet from the folder's listing alone: no image is opened (a corrupt or vanished file is found
    where it is decoded, under `max_corrupt`)."""
    from .listing import list_folder

    listing = list_folder(root)
    meta = {"file_name": listing.files}
    if listing.rows is not None:
        keys = sorted({k for r in listing.rows for k in r} - {"label", "class_id", "class_name", "file_name"})
        meta.update({k: [r.get(k) for r in listing.rows] for k in keys})
    return FileSet(name or f"imagefolder:{root}", listing.paths(), torch.tensor(listing.labels, dtype=torch.long),
                   listing.classes, meta, channels, max_corrupt)


def _header(path):
    """(width, height, mode) from the image header, or the reason it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.width, im.height, im.mode
    except Exception as e:  # PIL raises several kinds (UnidentifiedImageError, SyntaxError, OSError, ...)
        return e.__class__.__name__


def _headers(files):
    from concurrent.futures import ThreadPoolExecutor

    # opening a file is I/O bound; only small folders get here (STREAM_ABOVE)
    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(_header, files.files))


def _drop_unreadable(files, reasons, root, max_corrupt, report=True):
    """(files whose `reasons` entry is None or a header, unreadable paths); too many is an error."""
    bad = [i for i, h in enumerate(reasons) if isinstance(h, str)]
    if bad:
        first = f"unreadable image {files.files[bad[0]]} ({reasons[bad[0]]})"
        if len(bad) > max_corrupt * len(files) or len(bad) == len(files):
            raise ValueError(f"{first}; {len(bad)} of {len(files)} images in {root} are unreadable, more than "
                             f"--max-corrupt {max_corrupt:g} allows: delete or replace them")
        if report:
            logger.warning("%s: skipping %d unreadable of %d images (within --max-corrupt %g), e.g. %s",
                           root, len(bad), len(files), max_corrupt, first)
    badset = set(bad)
    ok = [i for i in range(len(files)) if i not in badset]
    kept = files.subset(ok) if bad else files
    kept.meta["size"] = [reasons[i][:2] for i in ok]
    return kept, [files.files[i] for i in bad]


def _card_channels(root):
    from .listing import read_card
    return read_card(root).get("channels")


def read_folder(root, channels=None, max_corrupt=0.01, name=None, stream=False):
    """An ImageFolder as an in-memory ImageSet (stream False) or a FileSet to stream (stream True).

    Args:
        channels: 1 or 3 (None: the folder card's "channels", else 3; never the first image's).
        max_corrupt: largest fraction of unreadable images that is skipped (with a warning) rather than an
            error. A streamed set is listed only (no file is opened here): the streaming decoder enforces it.
            An in-memory read decodes every image, so a file whose header reads but whose data does not
            counts too.
    Returns (set, skipped paths).
    """
    from .folder import _read_image

    channels = channels or _card_channels(root) or 3
    files = _listed(root, name, channels, max_corrupt)
    if stream:
        return files, []
    reasons = _headers(files)
    images = []
    for i, (p, h) in enumerate(zip(files.files, reasons)):
        if isinstance(h, str):
            images.append(None)
            continue
        try:
            images.append(_read_image(p, channels))
        except Exception:  # noqa: BLE001 - any decoder failure makes the file corrupt
            reasons[i] = "undecodable"
            images.append(None)
    files, skipped = _drop_unreadable(files, reasons, root, max_corrupt)
    images = [im for im in images if im is not None]
    sizes = sorted({tuple(im.shape[1:]) for im in images})
    if len(sizes) > 1:
        raise ValueError(f"{root}: images differ in size {sizes[:3]}; resize them first, or stream them "
                         "(--stream on resizes to the model's input size)")
    meta = {k: v for k, v in files.meta.items() if k != "size"}
    return ImageSet(files.name, torch.stack(images), files.labels, files.classes, meta), skipped


def _should_stream(sets):
    """Stream when the images are more than STREAM_ABOVE (decided from the listing: no header is read),
    would not fit in MEMORY_LIMIT decoded, or differ in size (then they are resized to the model's input size
    while streaming). Headers are read only below STREAM_ABOVE, to decide the last two."""
    n = sum(len(f) for f in sets)
    if n > STREAM_ABOVE:
        logger.info("streaming the training images from disk (%d images, more than %d)", n, STREAM_ABOVE)
        return True
    sizes = [s for f in sets for s in f.meta["size"]]
    big = sum(w * h for w, h in sizes) * sets[0].channels > MEMORY_LIMIT
    if big or len(set(sizes)) > 1:
        logger.info("streaming the training images from disk (%s)",
                    "too large for memory" if big else "images of several sizes")
        return True
    return False


# --- from specs to a training set --------------------------------------------------------------------

def _conform(gen, real, folder):
    """In-memory generated images must have the real images' shape (streamed ones are resized anyway)."""
    if tuple(gen.images.shape[1:]) != tuple(real.images.shape[1:]):
        raise ValueError(f"{folder}: images are {tuple(gen.images.shape[1:])}, the real ones "
                         f"{tuple(real.images.shape[1:])}; resize them, or stream both (--stream on)")


def build_training_set(real=None, generated=(), ratio=1.0, seed=0, mode=None, fraction=None, limit=None,
                       max_corrupt=0.01, stream="auto", channels=None):
    """Load and mix training data from specs.

    Args:
        real: a dataset spec (`digits-mnist/train`, `imagefolder:PATH`), or None. In `generated-only` mode a
            real spec only fixes the class list (and channels), none of its images are used.
        generated: generated folders (paths); several are pooled before drawing.
        ratio: k in `add` mode. fraction: f in `replace` mode. limit: images in `generated-only` mode.
        mode: one of MODES; None = `add` with real data, `generated-only` without.
        max_corrupt: fraction of unreadable images per folder that is skipped rather than an error (for a
            streamed set, enforced where images are decoded: `FileSet.max_corrupt`).
        stream: "auto", True or False: keep ImageFolders on disk (FileSet) rather than in memory. "auto"
            streams more than STREAM_ABOVE images from their listing alone.
        channels: what images are converted to (1 or 3). None: a registered dataset's own count; for
            ImageFolders the (real, else first generated) folder card's "channels", else 3.
    Returns (ImageSet or FileSet, info dict for the checkpoint's data.json, with the exact per-class counts).
    """
    from . import load_dataset

    mode = mode or ("add" if real else "generated-only")
    if mode not in MODES:
        raise ValueError(f"unknown --mode {mode!r}; choose from {', '.join(MODES)}")
    if real is None and not generated:
        raise ValueError("no training data: give a real dataset, generated folders, or both")
    if real is None and mode != "generated-only":
        raise ValueError(f"--mode {mode} needs real data; give --real, or use --mode generated-only")
    if mode == "generated-only" and not generated:
        raise ValueError("--mode generated-only needs generated data; pass --generated FOLDER")
    generated = [str(g) for g in generated]
    folder = real[len("imagefolder:"):] if real and real.startswith("imagefolder:") else None
    real_set, skipped = None, []
    if real and folder is None:
        if stream is True:
            raise ValueError(f"{real} is an in-memory dataset; --stream on is for ImageFolders")
        real_set, stream = load_dataset(real), False
        own = real_set.images.shape[1]
        if channels not in (None, own):
            raise ValueError(f"{real} has {own} channel(s), the recipe asks for {channels}; drop 'channels' "
                             "or use an ImageFolder")
        channels = own
    roots = ([(folder, real)] if folder else []) + [(g, g) for g in generated]
    # channels come from the recipe, else the (first) folder's card, else 3 (RGB): never from a first image
    channels = channels or (_card_channels(roots[0][0]) if roots else None) or 3
    # Every folder is listed (names only); headers are read only when "auto" must decide on a small set.
    listed = [_listed(root, name, channels, max_corrupt) for root, name in roots]
    if stream == "auto":
        if sum(len(f) for f in listed) <= STREAM_ABOVE:
            checked = [_drop_unreadable(f, _headers(f), root, max_corrupt, report=False)
                       for f, (root, _) in zip(listed, roots)]
            stream = _should_stream([f for f, _ in checked])
            if stream:  # the headers are read anyway: leave out what cannot be opened
                listed = []
                for (root, _), (f, bad) in zip(roots, checked):
                    if bad:
                        logger.warning("%s: skipping %d unreadable of %d images (within --max-corrupt %g), "
                                       "e.g. %s", root, len(bad), len(bad) + len(f), max_corrupt, bad[0])
                    listed.append(dataclasses.replace(f, meta={k: v for k, v in f.meta.items() if k != "size"}))
                    skipped += bad
        else:
            stream = _should_stream(listed)
    loaded = []
    for (root, name), files in zip(roots, listed):
        if not stream:
            files, bad = read_folder(root, channels, max_corrupt, name)
            skipped += bad
        loaded.append(files)
    if folder:
        real_set, loaded = loaded[0], loaded[1:]
    if real_set is not None:
        classes = list(real_set.classes)
    else:  # the union of the folders' class lists, in the order they first appear
        classes = []
        for s in loaded:
            classes += [c for c in s.classes if c not in classes]
    gen = None
    if loaded:
        if real_set is not None and isinstance(real_set, ImageSet):
            for s, g in zip(loaded, generated):
                _conform(s, real_set, g)
        aligned = [_align(dataclasses.replace(s, meta={**s.meta, "folder": [g] * len(s)}), classes)
                   for s, g in zip(loaded, generated)]
        gen = _concat(aligned, "+".join(generated))
    names = "+".join(pathlib.Path(g).name for g in generated)
    info = {"real": real, "generated": generated, "mode": mode, "seed": seed}
    if mode == "generated-only":
        mixed, counts = mix_generated_only(gen, limit, seed)
        info.update(limit=limit, label=f"generated only ({', '.join(pathlib.Path(g).name for g in generated)})")
        if real is None:
            counts["real"] = {}
    elif mode == "replace":
        f = 0.5 if fraction is None else fraction
        mixed, counts = mix_replace(real_set, gen, f, seed)
        info.update(fraction=f, label=real if gen is None or f == 0 else f"{real} with {f:g} of it {names}")
    else:
        r = ratio if gen is not None else 0.0
        mixed, counts = mix_add(real_set, gen, r, seed)
        info.update(ratio=r, label=real if gen is None else f"{real} + {ratio:g}x {names}")
    if gen is None or (mode == "replace" and info["fraction"] == 0) or (mode == "add" and info["ratio"] == 0):
        info["mode"] = "real-only"
    info["counts"] = counts
    if gen is not None:
        by = mixed.meta.get("folder", [None] * len(mixed))
        info["counts_by_folder"] = {g: dict(zip(mixed.classes, torch.bincount(
            mixed.labels[[i for i, f in enumerate(by) if f == g]], minlength=len(mixed.classes)).tolist()))
            for g in generated}
    info["num_images"] = len(mixed)
    info["stream"] = isinstance(mixed, FileSet)
    if skipped:
        info["skipped"] = skipped
    return mixed, info
