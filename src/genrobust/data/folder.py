"""ImageFolder layout on disk: `<root>/<class_dir>/<file>` plus optional `metadata.jsonl` and
`dataset_card.json` (DESIGN.md's generated dataset folder). Writing is atomic per file."""
import hashlib
import io
import json
import os
import pathlib

import numpy as np
import torch

from .imageset import ImageSet

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


def atomic_write_bytes(path, data):
    """Write to a temp file beside `path`, then rename: a killed writer never leaves a half file."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def atomic_write_text(path, text):
    atomic_write_bytes(path, text.encode())


def encode_png(image):
    """uint8 `C x H x W` tensor (C = 1 or 3) -> PNG bytes."""
    from PIL import Image

    arr = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    arr = arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_jsonl(path, rows):
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def read_jsonl(path):
    path = pathlib.Path(path)
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n} is not valid JSON ({e.msg}); fix or delete that line") from None
    return rows


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
    card = {"name": data.name, "classes": list(data.classes), "num_images": len(data), "counts": data.counts()}
    atomic_write_text(out / "dataset_card.json", json.dumps(card, indent=2))
    return out


def _read_image(path, channels):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            mode = {1: "L", 3: "RGB"}[channels] if channels else ("L" if im.mode in ("L", "1", "I;16") else "RGB")
            arr = np.array(im.convert(mode))
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"unreadable image {path} ({e.__class__.__name__}); delete or replace it") from None
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(arr))


def folder_classes(root):
    """Class names of a folder: the card's list, else metadata's ids, else the sorted class folders."""
    root = pathlib.Path(root)
    card = root / "dataset_card.json"
    if card.exists():
        classes = json.loads(card.read_text()).get("classes")
        if classes:
            return list(classes)
    meta = root / "metadata.jsonl"
    if meta.exists():
        by_id = {int(r["class_id"]): r["class_name"] for r in read_jsonl(meta) if "class_id" in r}
        if by_id and sorted(by_id) == list(range(len(by_id))):
            return [by_id[i] for i in range(len(by_id))]
    return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith((".", "shards")))


def list_labelled_files(root):
    """(manifest rows, classes, paths, class indices) of an ImageFolder, from `metadata.jsonl` when present.

    A missing folder, an empty one, a row of an unknown class or a listed file that is gone is an error.
    """
    root = pathlib.Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no such folder: {root}; give an ImageFolder (<root>/<class>/<image>)")
    meta_path = root / "metadata.jsonl"
    if meta_path.exists():
        rows = read_jsonl(meta_path)
    else:
        rows = [{"file_name": f"{d.name}/{f.name}", "class_name": d.name}
                for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith((".", "shards"))
                for f in sorted(d.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not rows:
        raise ValueError(f"{root} holds no images in class folders; expected <root>/<class>/<image>.png "
                         "(an ImageFolder)")
    classes = folder_classes(root)
    index = {c: i for i, c in enumerate(classes)}
    paths, labels = [], []
    for r in rows:
        cls = r.get("class_name") or pathlib.PurePosixPath(r["file_name"]).parent.name
        if cls not in index:
            raise ValueError(f"{root}: image {r['file_name']} has class {cls!r}, not in the folder's classes")
        path = root / r["file_name"]
        if not path.exists():
            raise FileNotFoundError(f"{root}/metadata.jsonl lists {r['file_name']}, which is missing")
        paths.append(path)
        labels.append(index[cls])
    return rows, classes, paths, labels


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
