"""ImageFolder layout on disk: `<root>/<class_dir>/<file>` plus optional `metadata.jsonl` and
`dataset_card.json` (DESIGN.md's generated dataset folder). Writing is atomic per file."""
import hashlib
import io
import json
import pathlib

import numpy as np
import torch

from .files import atomic_write_bytes, atomic_write_text, read_jsonl, write_jsonl  # noqa: F401 - re-exported
from .imageset import ImageSet

from .listing import IMAGE_SUFFIXES  # noqa: F401 - re-exported: report and testset import it from here


def encode_png(image):
    """uint8 `C x H x W` tensor (C = 1 or 3) -> PNG bytes."""
    from PIL import Image

    arr = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    arr = arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def export_imageset(data, out):
    """Write an ImageSet as an ImageFolder with `metadata.jsonl` and `dataset_card.json`."""
    out = pathlib.Path(out)
    rows = []
    width = len(str(max(len(data) - 1, 1)))
    for i in range(len(data)):
        cls = data.classes[int(data.labels[i])]
        file_name = f"{cls}/{i:0{width}d}.png"
        png = encode_png(data.images[i])
        atomic_write_bytes(out / file_name, png)
        row = {"file_name": file_name, "label": int(data.labels[i]), "class_id": int(data.labels[i]),
               "class_name": cls, "sha256": hashlib.sha256(png).hexdigest()}
        row.update({k: v[i] for k, v in data.meta.items() if k not in row})
        rows.append(row)
    write_jsonl(out / "metadata.jsonl", rows)
    # channels: a reader takes them from the recipe or the card, never from the first image
    card = {"name": data.name, "classes": list(data.classes), "num_images": len(data), "counts": data.counts(),
            "channels": int(data.images.shape[1])}
    atomic_write_text(out / "dataset_card.json", json.dumps(card, indent=2))
    return out


def _read_image(path, channels):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            mode = {1: "L", 3: "RGB"}[channels] if channels else ("L" if im.mode in ("L", "1", "I;16") else "RGB")
            arr = np.array(im.convert(mode))
    except FileNotFoundError:  # listings never stat files: a listed file that is gone shows up here
        raise FileNotFoundError(f"{path} is listed (its folder's metadata.jsonl or an earlier listing) but "
                                "missing; restore it or remove it from the manifest") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"unreadable image {path} ({e.__class__.__name__}); delete or replace it") from None
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(arr))


def folder_classes(root):
    """Class names of a folder: the card's list, else metadata's ids, else the sorted class folders."""
    from .listing import resolve_classes
    return resolve_classes(root)


def list_labelled_files(root):
    """(manifest rows, classes, paths, class indices) of an ImageFolder, from `metadata.jsonl` when present.

    Listed, never opened (`listing.list_folder`, cached): a missing folder, an empty one or a row of an
    unknown class is an error here; a listed file that is gone is found where it is decoded.
    """
    from .listing import list_folder
    listing = list_folder(root)
    rows = listing.rows
    if rows is None:
        rows = [{"file_name": f, "class_name": listing.classes[y]} for f, y in zip(listing.files, listing.labels)]
    root = pathlib.Path(root)
    return rows, listing.classes, [root / f for f in listing.files], list(listing.labels)


def load_imagefolder(root, channels=None, name=None):
    """Read an ImageFolder (with or without `metadata.jsonl`) into memory."""
    root = pathlib.Path(root)
    rows, classes, paths, labels = list_labelled_files(root)
    images = [_read_image(path, channels) for path in paths]
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) > 1:
        raise ValueError(f"{root}: images differ in size or channels {sorted(shapes)[:3]}; resize them first")
    keys = sorted({k for r in rows for k in r} - {"label", "class_id", "class_name"})
    meta = {k: [r.get(k) for r in rows] for k in keys}
    return ImageSet(name or f"imagefolder:{root}", torch.stack(images), torch.tensor(labels), classes, meta)


def align_classes(data, classes):
    """Relabel `data` onto the class list `classes` by class name (not folder order).

    Raises if `data` has a class that `classes` lacks.
    """
    missing = [c for c in data.classes if c not in classes]
    if missing:
        raise ValueError(f"{data.name} has classes {missing} that the real data lacks; "
                         f"its classes must be a subset of {classes}")
    remap = torch.tensor([classes.index(c) for c in data.classes], dtype=torch.long)
    return ImageSet(data.name, data.images, remap[data.labels], list(classes), dict(data.meta))
